"""Smoke tests of recipes/evaluate.py on a dataset slice and on a folder of XYZ files."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tyro

from sde_mol import io, metrics
from sde_mol.data.qm9 import load_qm9

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "evaluate.py"
KEYS = {"n_molecules", "atom_stability", "molecule_stability", "validity", "uniqueness", "valid_and_unique",
        "novelty", "seconds"}  # fmt: skip


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("recipe_evaluate", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_fractions(m: dict, novelty: bool) -> None:
    assert KEYS <= set(m)
    for k in ("atom_stability", "molecule_stability", "validity", "uniqueness", "valid_and_unique"):
        assert 0.0 <= m[k] <= 1.0, k
    assert (m["novelty"] is not None) == novelty
    assert m["seconds"] >= 0.0


def test_dataset_slice(recipe, tmp_path):
    out = tmp_path / "eval" / "metrics.json"
    returned = recipe.main(recipe.Config(dataset="qm9", split="test", limit=200, out=out))
    m = json.loads(out.read_text())
    check_fractions(m, novelty=True)
    assert m["n_molecules"] == 200 and m["source"] == "qm9/test"
    assert m == pytest.approx(json.loads(json.dumps(returned)))
    assert m["molecule_stability"] > 0.9 and m["validity"] > 0.9
    assert m["novelty"] > 0.9  # test molecules are (nearly) all absent from the train split
    config = json.loads((out.parent / "config.json").read_text())
    assert config["dataset"] == "qm9" and config["limit"] == 200 and config["out"] == str(out.resolve())


def test_xyz_folder_input(recipe, tmp_path):
    data = load_qm9("test")
    pos, types = data.positions[:30], data.atom_types[:30].astype(np.int64)
    pos[3] += 100.0  # a translated copy counts once in uniqueness
    io.write_molecules(tmp_path / "samples", pos, types)
    out = tmp_path / "metrics.json"
    recipe.main(recipe.Config(input=tmp_path / "samples", novelty=False, out=out))
    m = json.loads(out.read_text())
    check_fractions(m, novelty=False)
    expected = metrics.evaluate(*io.read_molecules(tmp_path / "samples"))
    assert m["n_molecules"] == 30
    for k in ("atom_stability", "molecule_stability", "validity", "uniqueness"):
        assert m[k] == pytest.approx(expected[k]), k


def test_config_errors_and_dry_run(recipe, tmp_path, capsys):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        recipe.main(recipe.Config())
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        recipe.main(recipe.Config(checkpoint=tmp_path / "missing.eqx"))
    with pytest.raises(ValueError, match="at most one of --input"):
        recipe.main(recipe.Config(input=tmp_path, dataset="qm9"))
    with pytest.raises(ValueError, match="--limit must be positive"):
        recipe.main(recipe.Config(dataset="qm9", limit=0))
    with pytest.raises(FileNotFoundError):
        recipe.main(recipe.Config(input=tmp_path / "missing"))
    out = tmp_path / "dry" / "metrics.json"
    assert recipe.main(recipe.Config(dataset="qm9", limit=5, out=out, dry_run=True)) is None
    assert "would evaluate 5 molecules" in capsys.readouterr().out
    assert not out.parent.exists()


def test_cli_parsing(recipe):
    cfg = tyro.cli(recipe.Config, args=["--dataset", "qm9", "--split", "valid", "--limit", "7", "--no-novelty"])
    assert cfg == recipe.Config(dataset="qm9", split="valid", limit=7, novelty=False)
    cfg = tyro.cli(recipe.Config, args=["--input", "samples", "--out", "r/metrics.json", "--dry-run"])
    assert cfg.input == Path("samples") and cfg.out == Path("r/metrics.json") and cfg.dry_run


def test_checkpoint_nll_is_batch_size_independent(recipe, tmp_path):
    import jax.random as jr

    from sde_mol import checkpoint
    from sde_mol.run.build import build_denoiser
    from sde_mol.run.configs import ModelConfig, ModelSpec, to_dict

    spec = ModelSpec(ModelConfig(hidden=8, n_layers=1))
    path = tmp_path / "tiny.eqx"
    checkpoint.save(path, build_denoiser(spec, key=jr.PRNGKey(0)), kind="denoiser", config={"spec": to_dict(spec)})
    out = tmp_path / "nll" / "metrics.json"
    a = recipe.main(recipe.Config(checkpoint=path, split="valid", limit=30, nll_batch_size=16, out=out))
    b = recipe.main(recipe.Config(checkpoint=path, split="valid", limit=30, nll_batch_size=7))
    c = recipe.main(recipe.Config(checkpoint=path, split="valid", limit=30, nll_batch_size=7, seed=1))
    assert a["nll_molecules"] == 30 and a["nll_split"] == "qm9/valid" and "atom_stability" not in a
    assert np.isfinite(a["nll"]) and a["nll"] > 0 and a["nll_sem"] > 0  # an untrained model: a large NLL
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)  # molecule i's draw depends on i and the seed only
    assert c["nll"] != pytest.approx(a["nll"], rel=1e-5)
    assert json.loads(out.read_text())["nll"] == pytest.approx(a["nll"])
