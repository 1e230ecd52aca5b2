"""How much of a few-step DDIM sampler's loss is its first step, the one from pure noise (t = 1, where an eps
model's x0 = (z - sigma eps) / alpha amplifies its error by 1 / alpha ~ 316 on EDM's schedule)?

Each model is sampled twice with the same molecules and prior noise: as it is (DDIM on its uniform grid of N
steps, then one x0 call), and with its first interval [1, 1 - 1/N] integrated instead by `--top-substeps`
fine DDIM steps of the reference teacher, the other N - 1 steps unchanged. The gap between the two rows is the
most that a better first step could give that model; what remains is lost below it.

Usage:
    python experiments/first_step.py --models runs/pd_qm9/student_8steps.eqx runs/pd_qm9/student_4steps.eqx \
        --teacher-steps 8 4
    (--models teacher samples the reference teacher itself with DDIM at the matching --teacher-steps entry)

Figures: experiments/NOTES.md, "Progressive distillation of the QM9 teacher".
"""

import json
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import tyro

from sde_mol.denoisers import AbstractDenoiser
from sde_mol.molecule import Molecule
from sde_mol.run.build import continuous_teacher, dataset_info
from sde_mol.run.load import load_denoiser
from sde_mol.run.recipe import score_samples
from sde_mol.samplers.steps import ddim_solve
from sde_mol.schedules import time_grid
from sde_mol.typing import Key, NodeMask


class TopReplacedDDIM(eqx.Module):
    """DDIM of `model` on the uniform N-step grid, its first interval done by `top_substeps` DDIM steps of
    `top` (0: the plain N-step sampler), then x0 = model(t_min, z). A `samplers.SamplerFn`."""

    top: AbstractDenoiser
    model: AbstractDenoiser
    n_steps: int = eqx.field(static=True)
    top_substeps: int = eqx.field(static=True)
    n_feat: int = eqx.field(static=True)

    def __call__(self, mask: NodeMask, *, key: Key) -> tuple[Molecule, jnp.ndarray]:
        sde = self.model.sde
        k_prior, k_top, k_rest = jr.split(key, 3)
        grid = time_grid(sde, self.n_steps)  # the student's uniform grid, t_max -> t_min
        z = sde.prior(mask, self.n_feat, key=k_prior)
        if self.top_substeps:
            z = ddim_solve(self.top, sde, z, mask, jnp.linspace(grid[0], grid[1], self.top_substeps + 1), key=k_top)
            grid = grid[1:]
        z = ddim_solve(self.model, sde, z, mask, grid, key=k_rest)
        nfe = self.top_substeps + grid.shape[0]
        return self.model(grid[-1], z, mask), jnp.asarray(nfe, jnp.int32)


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...]
    """student checkpoints (DDIM students of recipes/progressive_distill.py), or `teacher`"""
    teacher_steps: tuple[int, ...] = ()
    """the DDIM step count of each `teacher` entry of --models, in order"""
    teacher: Path = Path("checkpoints/edm_qm9_finetuned.eqx")
    """the reference teacher (run on its continuous twin) that integrates the first interval"""
    top_substeps: int = 32
    n_samples: int = 300
    seed: int = 0


def main(cfg: Config) -> list[dict]:
    teacher, spec = continuous_teacher(*load_denoiser(cfg.teacher)[:2])
    info = dataset_info(spec.dataset)
    teacher_steps = iter(cfg.teacher_steps)
    rows = []
    for name in cfg.models:
        if name == "teacher":
            model, n = teacher, next(teacher_steps)
        else:
            model, m_spec, header = load_denoiser(Path(name))
            n = int(header["config"]["distillation"]["student_steps"])
            if m_spec.sde != spec.sde:
                raise ValueError(f"--models {name}: its SDE {m_spec.sde} is not the teacher's twin {spec.sde}")
        for k in (0, cfg.top_substeps):
            fn = TopReplacedDDIM(teacher, model, n, k, info.n_feat)
            m = score_samples(fn, info, cfg.n_samples, seed=cfg.seed)
            keys = ("atom_stability", "molecule_stability", "validity", "valid_and_unique")
            nfe = k + (n - 1 if k else n) + 1
            rows.append({"model": name, "steps": n, "top_substeps": k, "nfe": nfe} | {x: m[x] for x in keys})
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Config))
