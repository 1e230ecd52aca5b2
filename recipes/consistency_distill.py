"""Consistency distillation (CD; Song et al. 2023, Algorithm 2) of a diffusion model into a consistency model that
samples in 1, 2 or 4 network evaluations.

The teacher's PF-ODE step is the same diffrax solver (--solver euler | heun) that pf_ode_sample.py integrates
with. EDM checkpoints use EDM's discrete schedule (DiscreteVPSDE), which is piecewise constant in time; CD runs on
its continuous twin (PolynomialVPSDE, the same schedule): the teacher's network is wrapped with it and the
student lives on it (see sde_mol/run/recipe.py). By default a checkpoint's student starts from the
teacher's weights (ECT, Geng et al. 2024): an eps teacher gives an EpsConsistencyFunction. --init scratch (and
every oracle teacher) trains a ConsistencyFunction on a new network from --spec.

Usage:
    python recipes/consistency_distill.py --teacher checkpoints/edm_qm9_small.eqx --out-dir runs/cd \
        --train.max-minutes 120
    python recipes/sample.py --checkpoint runs/cd/last.eqx --sampler.sampler consistency --sampler.steps 1
    python recipes/sample.py --checkpoint runs/cd/student.eqx --sampler.sampler consistency --sampler.steps 2
    python recipes/consistency_distill.py --teacher checkpoints/edm_qm9_small.eqx --solver euler --n-points 40 \
        --loss.distance pseudo_huber --loss.weighting inverse_step --init scratch --out-dir runs/cd_scratch
    python recipes/consistency_distill.py --teacher oracle:16 --train.steps 2000 --spec.model.hidden 32 \
        --spec.model.n-layers 2 --out-dir runs/cd_oracle                # exact-oracle teacher, quick
    python recipes/consistency_distill.py --out-dir runs/cd --resume runs/cd/last.eqx
    python recipes/consistency_distill.py --dry-run

Writes config.json, metrics.jsonl, last.eqx (a train_state: --resume it, or sample its EMA model), student.eqx
(a denoiser: the EMA consistency function; the header records the consistency sampler) and result.json.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import tyro

from sde_mol import cli
from sde_mol.objectives.consistency import TeacherStep
from sde_mol.run import consistency as cr, recipe as rr
from sde_mol.run.build import build_consistency_loss, build_denoiser, solver_from_name
from sde_mol.run.configs import (
    ModelSpec,
)
from sde_mol.schedules import constant_n

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "edm_qm9_finetuned.eqx"


@dataclass(frozen=True)
class Config(cr.RunConfig):
    teacher: str = str(DEFAULT_CHECKPOINT)
    """an sde_mol checkpoint (denoiser, or train_state: its EMA model), or oracle:<n>: the exact denoiser of the
    first n QM9 train molecules with --oracle-atoms atoms (under --oracle-rotations rotations)"""
    solver: Literal["euler", "heun"] = "heun"
    """the teacher's PF-ODE step (the diffrax solver of pf_ode_sample.py)"""
    n_points: int = 18
    """N: grid points in sigma / alpha (Song et al.: 18 on CIFAR-10)"""
    mu: float = 0.95
    """target EMA rate (Song et al. 0.95; 0 = the target is the student itself, iCT)"""
    init: Literal["auto", "teacher", "scratch"] = "auto"
    """student initialisation: teacher = a copy of a checkpoint teacher's network (ECT); scratch = a new network
    from --spec (its SDE is replaced by the teacher's continuous SDE); auto = teacher for checkpoints, scratch for
    oracle teachers"""
    oracle_atoms: int = 12
    """oracle:<n> takes molecules of this size (one node mask)"""
    oracle_rotations: int = 8
    """oracle:<n> holds each molecule under this many fixed random rotations (1 = as stored)"""
    out_dir: Path = Path("runs/cd")


def setup(cfg: Config):
    """(teacher on a continuous SDE, student, its spec, host batch source, TCM boundary model or None)."""
    teacher, student, spec, batches = teacher_and_student(cfg)
    if cfg.boundary is None:
        return teacher, student, spec, batches, None
    if cfg.init != "auto":
        raise ValueError(f"--boundary {cfg.boundary}: the student starts from the boundary's network (drop --init)")
    boundary, boundary_spec = cr.load_boundary(cfg.boundary, cfg.truncation_sigma)
    if boundary_spec.sde != spec.sde:
        raise ValueError(f"--boundary {cfg.boundary}: its SDE {boundary_spec.sde} is not the teacher's {spec.sde}")
    return teacher, boundary, boundary_spec, batches, boundary


def teacher_and_student(cfg: Config):
    n = rr.parse_count(cfg.teacher, "oracle", "--teacher")
    if n is not None:
        if cfg.init == "teacher":
            raise ValueError("--init teacher: an oracle teacher has no network to copy (use --init scratch)")
        cr.check_student_spec(cfg.spec)
        teacher, student, batches = rr.oracle_teacher(
            n, cfg.spec, atoms=cfg.oracle_atoms, rotations=cfg.oracle_rotations, init_seed=cfg.init_seed,
            data=cfg.data, data_seed=cfg.train.seed,
        )  # fmt: skip
        return teacher, student, cfg.spec, batches
    teacher, teacher_spec, _, _ = rr.checkpoint_teacher(Path(cfg.teacher), continuous_time=True, latent_ok=False)
    if cfg.init == "scratch":
        spec = ModelSpec(cfg.spec.model, teacher_spec.sde, cfg.spec.denoiser, teacher_spec.dataset)
        student = build_denoiser(spec, key=jr.PRNGKey(cfg.init_seed))
    else:
        student, spec = cr.student_from_teacher(teacher, teacher_spec)
    return teacher, student, spec, rr.qm9_batches(cfg.data, seed=cfg.train.seed)


def main(cfg: Config) -> dict:
    if cfg.n_points < 2 or not 0.0 <= cfg.mu <= 1.0:
        raise ValueError(f"--n-points {cfg.n_points} must be >= 2 and --mu {cfg.mu} in [0, 1]")
    if rr.start(cfg) is None:
        return {}
    teacher, student, spec, batches, boundary = setup(cfg)
    estimator = TeacherStep(teacher, solver_from_name(cfg.solver))
    cut = None if boundary is None else cfg.truncation_sigma
    n_points = eqx.Partial(constant_n, n=cfg.n_points)
    objective = build_consistency_loss(cfg.loss, estimator, n_points, boundary=boundary, boundary_sigma=cut)
    settings = {"teacher": cfg.teacher, "solver": cfg.solver, "n_points": cfg.n_points, "mu": cfg.mu}
    mu = cfg.mu
    return cr.train(
        cfg,
        method="cd",
        objective=objective,
        student=student,
        spec=spec,
        batches=batches,
        with_target=True,
        target_decay=lambda step: jnp.full((), mu, jnp.float32),
        resume_keys=("teacher", "solver", "n_points", "mu", "loss", "init", "spec", "oracle_atoms", "oracle_rotations"),
        settings=settings,
        boundary=boundary,
        truncation_sigma=cut,
    )


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
