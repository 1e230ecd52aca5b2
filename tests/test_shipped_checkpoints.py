"""Every checkpoint shipped in checkpoints/ loads with the current code (written before the redesign of the
outer ring, too): its model rebuilds from its header, its weights are finite and it denoises."""

import hashlib
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import load_recipe

from sde_mol import checkpoint
from sde_mol.molecule import Molecule, com_free_normal
from sde_mol.objectives.distribution_matching import GeneratorPair
from sde_mol.run.build import dataset_info
from sde_mol.run.load import load_denoiser
from sde_mol.run.recipe import checkpoint_teacher

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "checkpoints").glob("*.eqx"))


def test_there_are_shipped_checkpoints():
    assert any(p.name == "edm_qm9_base.eqx" for p in SHIPPED)


@pytest.mark.parametrize("recipe", ["sample", "pf_ode_sample", "progressive_distill", "consistency_distill"])
def test_every_recipe_default_checkpoint_is_shipped(recipe):
    default = load_recipe(recipe).DEFAULT_CHECKPOINT
    assert default in SHIPPED and checkpoint.read_header(default)["kind"] == "denoiser"


def _dmd_generator(path: Path, header: dict):
    """The EMA generator of a shipped DMD state, loaded as `--resume` loads it (teacher: the recipe's default,
    which must be the file's teacher by content)."""
    dmd = load_recipe("dmd_distill")
    assert (
        hashlib.sha256(dmd.DEFAULT_CHECKPOINT.read_bytes()).hexdigest()
        == (header["config"]["distillation"]["teacher_sha256"])
    )
    twin, spec, _, _ = checkpoint_teacher(dmd.DEFAULT_CHECKPOINT, continuous_time=True, latent_ok=False)
    state = dmd.load_state(path, GeneratorPair(twin, twin))
    assert int(state.step) == header["step"]
    return state.ema_model.generator, spec


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_checkpoint_loads_and_denoises(path):
    header = checkpoint.read_header(path)
    assert header["kind"] in ("denoiser", "train_state", "dmd_carry_state")
    if header["kind"] == "dmd_carry_state":
        den, spec = _dmd_generator(path, header)
    else:
        den, spec, _ = load_denoiser(path)
    info = dataset_info(spec.dataset)
    mask = jnp.arange(info.max_n_atoms) < 9
    x = com_free_normal(jr.key(0), mask, info.n_feat)
    t = jnp.float32(0.5 * (den.sde.t_min + den.sde.t_max))
    out = den(t, x, mask)
    assert isinstance(out, Molecule) and np.all(np.isfinite(np.asarray(out.positions)))
    np.testing.assert_allclose(np.asarray(out.positions[mask]).sum(0), 0.0, atol=1e-3)  # CoM-free output
