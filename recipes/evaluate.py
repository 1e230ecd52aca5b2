"""Evaluate molecules with EDM's sample metrics: atom and molecule stability, RDKit validity, uniqueness,
valid-and-unique, and novelty against the QM9 training SMILES.

Usage:
    # generated molecules: a folder of .xyz / .sdf files (sorted by name) or one multi-molecule file
    python recipes/evaluate.py --input samples/ --out runs/eval/metrics.json
    # the "Data" row of EDM's Table 2 (QM9 test split: mol stable 95.2, valid 97.7, valid & unique 97.7)
    python recipes/evaluate.py --dataset qm9 --split test --out runs/eval_qm9_test/metrics.json
    # quick look at the first 500 molecules, without the (one-off, cached) training-SMILES build
    python recipes/evaluate.py --dataset qm9 --limit 500 --no-novelty
    # check the configuration and the input, evaluate nothing
    python recipes/evaluate.py --input samples/ --dry-run

Metrics are printed as a table; with --out, metrics.json (plus the evaluation time in seconds) and the
resolved config.json are written into that folder.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rdkit
import tyro

import sde_mol
from sde_mol.data.qm9 import load_qm9
from sde_mol.io import read_molecules
from sde_mol.metrics import evaluate, train_smiles

METRIC_KEYS = (
    "atom_stability",
    "molecule_stability",
    "validity",
    "uniqueness",
    "valid_and_unique",
    "novelty",
)


@dataclass(frozen=True)
class Config:
    """Evaluate a set of molecules (generated samples or a dataset split). A `checkpoint` field for the
    model's NLL is planned; it will sit beside `input`."""

    input: Path | None = None
    """A .xyz / .sdf file or a folder of them holding the molecules to evaluate (exclusive with --dataset)."""
    dataset: Literal["qm9"] | None = None
    """Evaluate the molecules of a dataset split instead of files (exclusive with --input)."""
    split: Literal["train", "valid", "test"] = "test"
    """Dataset split used with --dataset."""
    limit: int | None = None
    """Evaluate only the first n molecules (quick runs)."""
    novelty: bool = True
    """Compute novelty against the QM9 training SMILES (built once, about 10 s on 2 cores, then cached)."""
    out: Path | None = None
    """Path of metrics.json; config.json is written beside it. Nothing is written without it."""
    dry_run: bool = False
    """Check the configuration and the input, print the plan, evaluate and write nothing."""


def check(cfg: Config) -> None:
    if (cfg.input is None) == (cfg.dataset is None):
        raise ValueError("give exactly one of --input (files of molecules) or --dataset (a dataset split)")
    if cfg.limit is not None and cfg.limit <= 0:
        raise ValueError(f"--limit must be positive, got {cfg.limit}")
    if cfg.input is not None and not cfg.input.exists():
        raise FileNotFoundError(f"--input {cfg.input}: no such file or folder")
    if cfg.out is not None and cfg.out.suffix != ".json":
        raise ValueError(f"--out must name a .json file, got {cfg.out}")


def load(cfg: Config) -> tuple[np.ndarray, np.ndarray, str]:
    """Positions, atom types and a description of the source, limited to the first `limit` molecules."""
    if cfg.input is not None:
        positions, atom_types = read_molecules(cfg.input)
        source = str(cfg.input)
    else:
        data = load_qm9(cfg.split)
        positions, atom_types, source = data.positions, data.atom_types, f"{cfg.dataset}/{cfg.split}"
    n = len(positions) if cfg.limit is None else min(cfg.limit, len(positions))
    return positions[:n], atom_types[:n], source


def resolved_config(cfg: Config) -> dict:
    paths = {k: str(v.resolve()) for k, v in asdict(cfg).items() if isinstance(v, Path)}
    return {**asdict(cfg), **paths, "sde_mol_version": sde_mol.__version__, "rdkit_version": rdkit.__version__}


def table(metrics: dict) -> str:
    rows = [f"{'source':<20s} {metrics['source']}", f"{'n_molecules':<20s} {metrics['n_molecules']}"]
    for k in METRIC_KEYS:
        v = metrics[k]
        rows.append(f"{k:<20s} {'-' if v is None else f'{100 * v:6.2f} %'}")
    rows.append(f"{'seconds':<20s} {metrics['seconds']:.1f}")
    return "\n".join(rows)


def main(cfg: Config) -> dict | None:
    check(cfg)
    config = resolved_config(cfg)
    if cfg.dry_run:
        positions, _, source = load(cfg)
        print(json.dumps(config, indent=2))
        print(f"dry run: would evaluate {len(positions)} molecules from {source}; nothing evaluated or written")
        return None
    positions, atom_types, source = load(cfg)
    t0 = time.perf_counter()
    reference = train_smiles("train", verbose=True) if cfg.novelty else None
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate(positions, atom_types, reference)
    metrics = {"source": source, **metrics, "seconds": time.perf_counter() - t0, "reference_seconds": t_ref}
    print(table(metrics))
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(metrics, indent=2) + "\n")
        (cfg.out.parent / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {cfg.out} and {cfg.out.parent / 'config.json'}")
    return metrics


if __name__ == "__main__":
    main(tyro.cli(Config))
