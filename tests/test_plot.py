"""tools/plot.py on tiny inputs: each picture is written as a PNG."""

import json

import numpy as np
import pytest
from helpers import load_tool
from PIL import Image

from sde_mol import io
from sde_mol.cli import UsageError
from sde_mol.data.qm9 import load_qm9


@pytest.fixture(scope="module")
def plot():
    return load_tool("plot")


def _is_png(path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and min(image.size) > 50


def test_curve_and_tradeoff(plot, tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    rows = [{"step": s, "loss": 2.0 - 0.01 * s} for s in range(0, 50, 10)]
    rows += [{"step": 40, "eval": {"val_nll": -20.0, "atom_stability": 0.8, "molecule_stability": 0.05}}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _is_png(plot.curve(log, out=tmp_path / "curve.png"))
    paths = []
    for name, nfe, atom, speed in [("ddim", 50, 0.7, 5.0), ("ddim", 100, 0.75, 2.5), ("reverse_sde", 500, 0.84, 0.6)]:
        path = tmp_path / f"{name}_{nfe}" / "metrics.json"
        path.parent.mkdir()
        m = {"sampler": {"sampler": name}, "checkpoint": "base.eqx", "nfe": nfe, "atom_stability": atom}
        m.update(molecule_stability=atom / 10, validity=atom / 2, molecules_per_second=speed)
        path.write_text(json.dumps(m))
        paths.append(path)
    assert _is_png(plot.tradeoff(paths, out=tmp_path / "tradeoff.png"))
    # a labelled student joins the table: rows in NFE order, the label as its method
    path = tmp_path / "student" / "metrics.json"
    path.parent.mkdir()
    m = {"sampler": {"sampler": "ddim"}, "label": "PD student", "checkpoint": "s.eqx", "nfe": 8, "atom_stability": 0.5}
    path.write_text(json.dumps(m | {"molecule_stability": 0.0, "validity": 0.25, "molecules_per_second": 40.0}))
    text = plot.table([*paths, path], out=tmp_path / "table.md")
    lines = text.splitlines()[2:]
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| 8", "PD student"], ["| 50", "ddim (base)"], ["| 100", "ddim (base)"], ["| 500", "reverse_sde (base)"]
    ]  # fmt: skip
    assert "| 50.0 % | 0.0 % | 25.0 % |" in lines[0] and (tmp_path / "table.md").read_text() == text + "\n"
    (tmp_path / "bad.json").write_text(json.dumps({"nfe": 3}))
    with pytest.raises(UsageError, match="bad.json: not a metrics.json"):
        plot.table([tmp_path / "bad.json"])


def test_bonds_and_grid_of_real_molecules(plot, tmp_path):
    data = load_qm9("valid").subset(slice(0, 12))
    sdf = tmp_path / "samples.sdf"
    jitter = np.random.default_rng(0).normal(scale=0.02, size=data.positions.shape).astype(np.float32)
    io.write_sdf(sdf, np.where(data.atom_types[..., None] >= 0, data.positions + jitter, 0), data.atom_types)
    assert _is_png(plot.bonds(sdf, out=tmp_path / "bonds.png", n_reference=200, n_types=4))
    assert _is_png(plot.grid(sdf, out=tmp_path / "grid.png", n=8, per_row=4))
