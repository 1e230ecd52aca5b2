"""sde_mol/__init__.py: the curated names a notebook imports from the top level."""

import re

import sde_mol


def test_every_name_the_docstring_lists_is_exported_and_is_the_module_object():
    listed = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\b", sde_mol.__doc__.split("deeper names")[1]))
    names = {n for n in listed if hasattr(sde_mol, n) and not n.startswith("_")}
    expected = {"Molecule", "AbstractSDE", "DiscreteVPSDE", "EGNN", "EpsDenoiser", "PFODE", "make_step"}
    expected |= {"sample_molecules", "ProgressiveDistillation", "ConsistencyLoss", "load_denoiser", "evaluate"}
    assert expected <= names
    from sde_mol import samplers, sde

    assert sde_mol.PFODE is samplers.PFODE and sde_mol.KarrasSDE is sde.KarrasSDE
    assert sde_mol.__version__ == "0.1.0"
