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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import tyro

from sde_mol import checkpoint, cli
from sde_mol.data.fixed import fixed_molecules
from sde_mol.latent import is_latent
from sde_mol.objectives.consistency import TeacherStep
from sde_mol.run import recipe as cr
from sde_mol.run.build import build_consistency_loss, build_denoiser, continuous_teacher, solver_from_name
from sde_mol.run.configs import (
    ConsistencyLossConfig,
    DataConfig,
    DenoiserConfig,
    ModelConfig,
    ModelSpec,
    OptimConfig,
    SDEConfig,
    to_dict,
)
from sde_mol.run.load import load_denoiser
from sde_mol.schedules import constant_n
from sde_mol.training.loop import LoopConfig

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "edm_qm9_base.eqx"


@dataclass(frozen=True)
class Config:
    teacher: str = str(DEFAULT_CHECKPOINT)
    """an sde_mol checkpoint (denoiser, or train_state: its EMA model), or oracle:<n>: the exact denoiser of the
    first n QM9 train molecules with --oracle-atoms atoms (under --oracle-rotations rotations)"""
    solver: Literal["euler", "heun"] = "heun"
    """the teacher's PF-ODE step (the diffrax solver of pf_ode_sample.py)"""
    n_points: int = 18
    """N: grid points in sigma / alpha (Song et al.: 18 on CIFAR-10)"""
    mu: float = 0.95
    """target EMA rate (Song et al. 0.95; 0 = the target is the student itself, iCT)"""
    loss: ConsistencyLossConfig = field(default_factory=ConsistencyLossConfig)
    init: Literal["auto", "teacher", "scratch"] = "auto"
    """student initialisation: teacher = a copy of a checkpoint teacher's network (ECT); scratch = a new network
    from --spec; auto = teacher for checkpoints, scratch for oracle teachers"""
    spec: ModelSpec = field(
        default_factory=lambda: ModelSpec(
            ModelConfig(hidden=64, n_layers=4), SDEConfig("vp_polynomial"), DenoiserConfig("consistency", 0.5)
        )
    )
    """a scratch student (its SDE is replaced by the teacher's continuous SDE)"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, ema_decay=0.9999, clip="1.0"))
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=64, buckets=(17, 20, 23, 29)))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=100_000, log_every=100, ckpt_every=1000))
    oracle_atoms: int = 12
    """oracle:<n> takes molecules of this size (one node mask)"""
    oracle_rotations: int = 8
    """oracle:<n> holds each molecule under this many fixed random rotations (1 = as stored)"""
    eval_samples: int = 0
    """molecules sampled and scored at the end for each of --eval-steps; 0 = skip"""
    eval_steps: tuple[int, ...] = (1, 2)
    out_dir: Path = Path("runs/cd")
    resume: Path | None = None
    """a last.eqx of this recipe (same teacher and settings) to continue from"""
    init_seed: int = 0
    boundary: Path | None = None
    """TCM stage 2 (Lee et al. 2025): a stage-1 student.eqx of this recipe; the student starts from its network,
    trains only above --truncation-sigma (needs --loss.index uniform) and takes its targets at and below it from
    the frozen stage-1 model; student.eqx is then the joined truncated consistency model"""
    truncation_sigma: float | None = None
    """with --boundary: TCM's truncation level s' (in sigma / alpha, e.g. 0.16)"""
    dry_run: bool = False


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
    n = cr.parse_count(cfg.teacher, "oracle", "--teacher")
    if n is not None:
        if cfg.init == "teacher":
            raise ValueError("--init teacher: an oracle teacher has no network to copy (use --init scratch)")
        spec = cfg.spec
        cr.check_student_spec(spec)
        student = build_denoiser(spec, key=jr.PRNGKey(cfg.init_seed))
        teacher, batches = fixed_molecules(
            n, cfg.oracle_atoms, student.sde, rotations=cfg.oracle_rotations, seed=cfg.init_seed,
            batch_size=cfg.data.batch_size, data_seed=cfg.train.seed,
        )  # fmt: skip
        return teacher, student, spec, batches
    path = Path(cfg.teacher)
    if not path.is_file():
        raise FileNotFoundError(f"--teacher {path} does not exist (a checkpoint path, or oracle:<n>)")
    if is_latent(checkpoint.read_header(path)):
        raise ValueError(f"--teacher {path}: latent teachers are not supported by consistency distillation yet")
    teacher, teacher_spec, _ = load_denoiser(path)
    teacher, teacher_spec = continuous_teacher(teacher, teacher_spec)
    if cfg.init == "scratch":
        spec = ModelSpec(cfg.spec.model, teacher_spec.sde, cfg.spec.denoiser, teacher_spec.dataset)
        student = build_denoiser(spec, key=jr.PRNGKey(cfg.init_seed))
    else:
        student, spec = cr.student_from_teacher(teacher, teacher_spec)
    return teacher, student, spec, cr.qm9_batches(cfg.data, seed=cfg.train.seed)


def main(cfg: Config) -> dict:
    print(json.dumps(to_dict(cfg), indent=2, default=str))
    if cfg.dry_run:
        return {}
    if cfg.n_points < 2 or not 0.0 <= cfg.mu <= 1.0:
        raise ValueError(f"--n-points {cfg.n_points} must be >= 2 and --mu {cfg.mu} in [0, 1]")
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
