"""At which noise levels a sampler's molecules are off the data: the teacher's eps MSE per noise level on the
sampled molecules, noised, against the same on QM9 validation molecules (one noise draw per molecule and level).

A diffusion model denoises molecules of its training distribution with an error e_data(t). Molecules off that
distribution at the scale a level resolves are denoised worse there, so a ratio e_samples(t) / e_data(t) (of
the per-molecule medians; the means too) above the ratio of the teacher's own best samples shows where a
few-step sampler or a student is wrong (low t: bond lengths and angles; middle t: which atoms bond to which;
high t: the overall shape). Distribution matching distillation trains on the same comparison, through a fake
denoiser instead of the data. The probe reads only the molecules (the SDF / XYZ files recipes/sample.py
writes), so any sampler, student or model can be compared.

Usage:
    python experiments/sample_levels.py --samples samples/nfe_ft/recommended samples/nfe_ft/ancestral_karras_4 \
        samples/dmd_4_1000
    python experiments/sample_levels.py --samples samples/x/samples.sdf --teacher checkpoints/edm_qm9_base.eqx

Figures: experiments/NOTES.md, "At which noise levels few-step samples are wrong".
"""

import json
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

from sde_mol.data.loader import encode_split
from sde_mol.data.qm9 import QM9Split, load_qm9
from sde_mol.io import read_molecules
from sde_mol.molecule import Molecule, com_free_normal
from sde_mol.objectives.denoising import eps_error
from sde_mol.run.build import dataset_info
from sde_mol.run.load import load_denoiser

DEFAULT_TEACHER = Path(__file__).resolve().parents[1] / "checkpoints" / "edm_qm9_finetuned.eqx"


@dataclass(frozen=True)
class Config:
    samples: tuple[Path, ...]
    """molecule files or folders of them (.sdf / .xyz; e.g. a recipes/sample.py --out-dir)"""
    teacher: Path = DEFAULT_TEACHER
    """the model whose denoising error is the probe (its own SDE, as trained)"""
    levels: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)
    n_valid: int = 1000
    """the first n molecules of the QM9 validation split (the reference)"""
    seed: int = 7
    chunk: int = 250
    spread_radius: float = 10.0
    """molecules with an atom further than this (Angstrom) from their centre are counted as spread out"""


def as_split(path: Path, capacity: int) -> QM9Split:
    """The molecules of a file or folder as a QM9Split (raw units), for `encode_split`."""
    positions, types = read_molecules(path, capacity=capacity)
    n = types.shape[0]
    n_atoms = (types >= 0).sum(axis=1).astype(np.int32)
    return QM9Split(
        str(path), np.arange(1, n + 1, dtype=np.int32), n_atoms, types.astype(np.int8), positions,
        np.full(n, "", dtype=object),
    )  # fmt: skip


def max_radius(split: QM9Split) -> np.ndarray:
    """Each molecule's largest distance of an atom from its centre (Angstrom)."""
    return np.linalg.norm(split.centred_positions(), axis=-1).max(axis=1)


def main(cfg: Config) -> dict:
    if not cfg.samples:
        raise SystemExit("--samples: expected at least one molecule file or folder")
    info = dataset_info("qm9")
    den, _, _ = load_denoiser(cfg.teacher)
    sets = {"qm9/valid": load_qm9("valid").subset(slice(0, cfg.n_valid))}
    sets |= {str(p): as_split(p, info.max_n_atoms) for p in cfg.samples}

    @eqx.filter_jit
    def errors(x, m, t, key):  # per molecule: (sum of squared eps errors, state entries)
        noise = jax.vmap(lambda k, mm: com_free_normal(k, mm, info.n_feat))(jr.split(key, m.shape[0]), m)
        return jax.vmap(lambda xx, mm, e: eps_error(den, xx, mm, t, e))(x, m, noise)

    def per_level(split: QM9Split) -> np.ndarray:
        """(levels, molecules): each molecule's eps MSE per state entry at each level."""
        pos, feat, mask = encode_split(split, info)
        out = []
        for t in cfg.levels:
            level = []
            for i in range(0, len(split), cfg.chunk):
                x = Molecule(jnp.asarray(pos[i : i + cfg.chunk]), jnp.asarray(feat[i : i + cfg.chunk]))
                key = jr.fold_in(jr.key(cfg.seed), i)
                e, n = errors(x, jnp.asarray(mask[i : i + cfg.chunk]), jnp.float32(t), key)
                level.append(np.asarray(e) / np.asarray(n))
            out.append(np.concatenate(level))
        return np.stack(out)

    mse = {name: per_level(split) for name, split in sets.items()}
    mean = {k: v.mean(axis=1) for k, v in mse.items()}
    median = {k: np.median(v, axis=1) for k, v in mse.items()}
    samples = [k for k in mse if k != "qm9/valid"]
    report = {
        "teacher": str(cfg.teacher),
        "levels": list(cfg.levels),
        "molecules": {name: len(split) for name, split in sets.items()},
        # a few scattered molecules (atoms hundreds of Angstrom out) dominate a mean: the median is the typical one
        "spread_out": {k: int(np.sum(max_radius(sets[k]) > cfg.spread_radius)) for k in mse},
        "eps_mse_median": {k: np.round(v, 5).tolist() for k, v in median.items()},
        "median_ratio_to_data": {k: np.round(median[k] / median["qm9/valid"], 3).tolist() for k in samples},
        "eps_mse_mean": {k: np.round(v, 5).tolist() for k, v in mean.items()},
        "mean_ratio_to_data": {k: np.round(mean[k] / mean["qm9/valid"], 3).tolist() for k in samples},
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(tyro.cli(Config))
