"""Evaluate molecules with EDM's sample metrics: atom and molecule stability, RDKit validity, uniqueness,
valid-and-unique, and novelty against the QM9 training SMILES.

Usage:
    # generated molecules: a folder of .xyz / .sdf files (sorted by name) or one multi-molecule file
    python recipes/evaluate.py --input samples/ --out runs/eval/metrics.json
    # the "Data" row of EDM's Table 2 (QM9 test split: mol stable 95.2, valid 97.7, valid & unique 97.7)
    python recipes/evaluate.py --dataset qm9 --split test --out runs/eval_qm9_test/metrics.json
    python recipes/evaluate.py --dataset qm9 --limit 500 --no-novelty   # quick: no training-SMILES build
    python recipes/evaluate.py --input samples/ --dry-run       # check the configuration and the input only
    # a model's test-set NLL (EDM's variational bound, nats per molecule; EMA weights of a training state)
    python recipes/evaluate.py --checkpoint checkpoints/edm_qm9_small.eqx --split test
    python recipes/evaluate.py --checkpoint checkpoints/edm_qm9_small.eqx --input samples/pf_ode/samples.sdf  # both

Metrics are printed as a table; with --out, metrics.json (plus the evaluation time in seconds) and the
resolved config.json are written into that folder.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rdkit
import tyro

import sde_mol
from sde_mol import cli
from sde_mol.data.qm9 import load_qm9
from sde_mol.io import read_molecules
from sde_mol.metrics import SAMPLE_METRICS, evaluate, train_smiles
from sde_mol.run import recipe as rr


@dataclass(frozen=True)
class Config:
    """Evaluate a set of molecules (generated samples or a dataset split) and/or a model's NLL on a split."""

    input: Path | None = None
    """A .xyz / .sdf file or a folder of them holding the molecules to evaluate (exclusive with --dataset)."""
    dataset: Literal["qm9"] | None = None
    """Evaluate the molecules of a dataset split instead of files (exclusive with --input)."""
    split: Literal["train", "valid", "test"] = "test"
    """Dataset split used with --dataset, and for --checkpoint's NLL."""
    checkpoint: Path | None = None
    """An sde_mol checkpoint (denoiser or training state, its EMA model): report its NLL on --split
    (EDM's variational bound in nats per molecule, one draw of t and noise per molecule, as EDM reports it)."""
    nll_batch_size: int = 200
    seed: int = 0
    """Key of the NLL's draws of t and noise."""
    limit: int | None = None
    """Evaluate only the first n molecules (quick runs)."""
    novelty: bool = True
    """Compute novelty against the QM9 training SMILES (built once, about 10 s on 2 cores, then cached)."""
    out: Path | None = None
    """Path of metrics.json; config.json is written beside it. Nothing is written without it."""
    dry_run: bool = False
    """Check the configuration and the input, print the plan, evaluate and write nothing."""


def check(cfg: Config) -> None:
    if cfg.input is not None and cfg.dataset is not None:
        raise ValueError("give at most one of --input (files of molecules) or --dataset (a dataset split)")
    if cfg.input is None and cfg.dataset is None and cfg.checkpoint is None:
        raise ValueError("nothing to evaluate: give --input, --dataset or --checkpoint")
    if cfg.checkpoint is not None and not cfg.checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such file")
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
        if not np.any(atom_types == 0):  # index 0 of QM9's decoder is H
            print(
                f"warning: {cfg.input} has no hydrogen atoms; EDM's stability counts explicit hydrogens, so every "
                "heavy atom will score as unstable (write the molecules with explicit H)",
                file=sys.stderr,
            )
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
    for k in SAMPLE_METRICS:
        v = metrics[k]
        rows.append(f"{k:<20s} {'-' if v is None else f'{100 * v:6.2f} %'}")
    rows.append(f"{'seconds':<20s} {metrics['seconds']:.1f}")
    return "\n".join(rows)


def main(cfg: Config) -> dict | None:
    check(cfg)
    config = resolved_config(cfg)
    has_molecules = cfg.input is not None or cfg.dataset is not None
    if cfg.dry_run:
        print(json.dumps(config, indent=2))
        if has_molecules:
            positions, _, source = load(cfg)
            print(f"dry run: would evaluate {len(positions)} molecules from {source}")
        if cfg.checkpoint is not None:
            print(f"dry run: would compute the NLL of {cfg.checkpoint} on the {cfg.split} split")
        print("nothing evaluated or written")
        return None
    metrics = {}
    if has_molecules:
        positions, atom_types, source = load(cfg)
        t0 = time.perf_counter()
        reference = train_smiles("train", verbose=True) if cfg.novelty else None
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = evaluate(positions, atom_types, reference)
        metrics = {"source": source, **metrics, "seconds": time.perf_counter() - t0, "reference_seconds": t_ref}
        print(table(metrics))
    if cfg.checkpoint is not None:
        nll = rr.split_nll(cfg.checkpoint, cfg.split, limit=cfg.limit, seed=cfg.seed, batch_size=cfg.nll_batch_size)
        metrics.update(nll)
        sem = "" if nll["nll_sem"] is None else f" +- {nll['nll_sem']:.2f}"
        print(
            f"{'nll':<20s} {nll['nll']:.2f}{sem} nats/molecule ({nll['nll_split']}, {nll['nll_molecules']} molecules)"
        )
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(metrics, indent=2) + "\n")
        (cfg.out.parent / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {cfg.out} and {cfg.out.parent / 'config.json'}")
    return metrics


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
