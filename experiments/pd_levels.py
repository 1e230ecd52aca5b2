"""Which noise levels a progressive-distillation student gets wrong: at each of its N steps t_i -> t_{i-1}, on the
same validation molecules and noise for every model (a paired comparison),
* `distill`: its distillation loss there, the truncated-SNR weighted x0 error against its teacher's two-step
  target x~ (what training minimised; with a stochastic teacher it includes the target's own variance),
* `student_x0` / `teacher_x0`: the x0 error per state dimension of the student's estimate and of the
  teacher's one-evaluation estimate against the data, unweighted,
* `target_x0`: the same for the two-step target x~ (the teacher's two steps, read as one step's x0),
* `distill_trajectory`: the distillation loss again, at states the teacher's own sampler reaches instead (its
  2N-step trajectory from the prior, molecules of the same sizes; the states a student meets when it replaces
  its teacher), against `distill` at noised data states z_t = alpha x + sigma eps (what training sees).

Usage:
    python experiments/pd_levels.py --student runs/pd_qm9/student_8steps.eqx \
        --teacher runs/pd_qm9/student_16steps.eqx
    python experiments/pd_levels.py --student runs/pd_qm9/student_256steps.eqx \
        --teacher checkpoints/edm_qm9_base.eqx --continuous-time    # round 0: the original teacher

The teacher's step kind and the target's come from the student's header (`distillation`), as the run used them.
Figures: experiments/NOTES.md, "Progressive distillation of the QM9 teacher".
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
from sde_mol.data.qm9 import load_qm9
from sde_mol.molecule import Molecule, com_free_normal, project, squared_error, state_dim
from sde_mol.objectives.progressive import (
    HalvingSchedule,
    ProgressiveDistillation,
    ddim_target,
)
from sde_mol.run.build import continuous_teacher, dataset_info
from sde_mol.run.load import load_denoiser
from sde_mol.run.progressive import ETA


@dataclass(frozen=True)
class Config:
    student: Path
    """a student_<N>steps.eqx of recipes/progressive_distill.py"""
    teacher: Path
    """its teacher: the previous round's student, or the run's original teacher"""
    continuous_time: bool = False
    """run the teacher on the continuous twin of its SDE (an EDM discrete-table teacher, as the run did)"""
    n_valid: int = 500
    """the first n molecules of the QM9 validation split"""
    seed: int = 11
    chunk: int = 250


def main(cfg: Config) -> dict:
    student, spec, header = load_denoiser(cfg.student)
    teacher, t_spec, _ = load_denoiser(cfg.teacher)
    if cfg.continuous_time:
        teacher, t_spec = continuous_teacher(teacher, t_spec)
    dist = header["config"].get("distillation")
    if dist is None:
        raise ValueError(f"--student {cfg.student}: not a progressive-distillation student (no 'distillation')")
    if t_spec.sde != spec.sde:
        raise ValueError(f"--teacher {cfg.teacher}: its SDE {t_spec.sde} is not the student's {spec.sde}")
    n = int(dist["student_steps"])
    info = dataset_info(spec.dataset)
    pos, feat, mask = encode_split(load_qm9("valid").subset(slice(0, cfg.n_valid)), info)
    sde = student.sde
    etas = {"teacher_eta": ETA[dist["teacher_sampler"]], "student_eta": ETA[dist["target"]]}
    weighting = {"eps_below_snr": dist.get("eps_below_snr", 0.0)}  # 0: students of runs before the option
    noise = dist["teacher_sampler"] != "ddpm_mean"  # the mean-path target: the teacher's steps without noise
    pd = ProgressiveDistillation(sde, HalvingSchedule(2 * n, 1, 1), **etas, **weighting, teacher_noise=noise)

    def target_at(z, m, t, t_mid, t_end, key):
        """The two-step target x~ from state z (the teacher's two steps, solved for the student's step)."""
        z_end = pd.teacher_endpoint(teacher, t, t_mid, t_end, z, m, key=key)
        return ddim_target(sde, t, t_end, z, z_end, pd.student_eta)

    def one(x, m, t, t_mid, t_end, key):
        k_eps, k_teacher = jr.split(key)
        alpha, sigma = sde.marginal(t)
        z = project(alpha * x + sigma * com_free_normal(k_eps, m, info.n_feat), m)
        target = target_at(z, m, t, t_mid, t_end, k_teacher)
        x_s, x_t = student(t, z, m), teacher(t, z, m)
        dim = state_dim(m, info.n_feat)
        w = pd.weight(t)
        return (
            jnp.stack(
                [
                    w * squared_error(x_s, target, m),
                    squared_error(x_s, x, m),
                    squared_error(x_t, x, m),
                    squared_error(target, x, m),
                ]
            )
            / dim
        )

    def distill_at(z, m, t, t_mid, t_end, key):
        target = target_at(z, m, t, t_mid, t_end, key)
        return pd.weight(t) * squared_error(student(t, z, m), target, m) / state_dim(m, info.n_feat)

    @eqx.filter_jit
    def chunk_sums(x, m, t, t_mid, t_end, key):
        keys = jr.split(key, m.shape[0])
        return jnp.sum(jax.vmap(one, in_axes=(0, 0, None, None, None, 0))(x, m, t, t_mid, t_end, keys), axis=0)

    @eqx.filter_jit
    def trajectory_sums(z, m, t, t_mid, t_end, key):
        keys = jr.split(key, m.shape[0])
        return jnp.sum(jax.vmap(distill_at, in_axes=(0, 0, None, None, None, 0))(z, m, t, t_mid, t_end, keys))

    @eqx.filter_jit
    def trajectories(m, key):
        """The teacher's own 2N-step chain from the prior, at the student's levels N..1 (`teacher_trajectory`)."""

        def chain(mask_i, key_i):
            return pd.teacher_trajectory(teacher, n, mask_i, info.n_feat, key=key_i)

        return jax.vmap(chain)(m, jr.split(key, m.shape[0]))  # states[b, k] at level N - k

    states = {}
    for lo in range(0, cfg.n_valid, cfg.chunk):
        states[lo] = trajectories(jnp.asarray(mask[lo : lo + cfg.chunk]), jr.fold_in(jr.key(cfg.seed + 1), lo))

    rows = []
    for i in range(n, 0, -1):
        t, t_mid, t_end = pd.grid(i, jnp.float32(n))
        total = np.zeros(5)
        for lo in range(0, cfg.n_valid, cfg.chunk):
            x = Molecule(jnp.asarray(pos[lo : lo + cfg.chunk]), jnp.asarray(feat[lo : lo + cfg.chunk]))
            m = jnp.asarray(mask[lo : lo + cfg.chunk])
            key = jr.fold_in(jr.fold_in(jr.key(cfg.seed), i), lo)
            total[:4] += np.asarray(chunk_sums(x, m, t, t_mid, t_end, key))
            z = jax.tree.map(lambda a, k=n - i: a[:, k], states[lo])  # the teacher's state at level i
            total[4] += float(trajectory_sums(z, m, t, t_mid, t_end, jr.fold_in(key, 1)))
        mean = total / cfg.n_valid
        names = ("distill", "student_x0", "teacher_x0", "target_x0", "distill_trajectory")
        row = {"t": round(float(t), 4), "t_end": round(float(t_end), 4)}
        rows.append(row | {k: float(f"{v:.4g}") for k, v in zip(names, mean, strict=True)})
        print(json.dumps(rows[-1]), flush=True)
    return {"student": str(cfg.student), "teacher": str(cfg.teacher), "student_steps": n, "levels": rows}


if __name__ == "__main__":
    main(tyro.cli(Config))
