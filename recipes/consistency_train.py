"""Consistency training (CT; Song et al. 2023, Algorithm 3) of a consistency model on QM9 without a teacher: the
earlier point of each trajectory pair is the unbiased estimate alpha(t_n) (x + s_n z) with the same data point x
and noise z.

Curricula (--curriculum): "ict" (Song & Dhariwal 2023): N(k) doubles from 11 to 1281 in equal stages, no target
EMA (the target is the stop-gradient student), with pseudo-Huber distance, 1 / (s_{n+1} - s_n) weighting and the
log-normal interval index (the --loss defaults here); "song" (Song et al. 2023): N(k) grows from 2 to 151 as a
square root and the target EMA rate follows mu(k) = exp(s0 log(mu0) / N(k)); combine it with --loss.distance l2
--loss.weighting uniform --loss.index uniform for the original recipe. Both curricula run over --train.steps and
are traced: one compilation serves every N. --init-from starts from an EDM checkpoint's network (ECT).

Usage:
    python recipes/consistency_train.py --out-dir runs/ct --train.max-minutes 120
    python recipes/sample.py --checkpoint runs/ct/last.eqx --sampler.sampler consistency --sampler.steps 1
    python recipes/consistency_train.py --curriculum song --loss.distance l2 --loss.weighting uniform \
        --loss.index uniform --out-dir runs/ct_song
    python recipes/consistency_train.py --init-from checkpoints/edm_qm9_small.eqx --out-dir runs/ect
    python recipes/consistency_train.py --molecules fixed:16 --train.steps 2000 --spec.model.hidden 32 \
        --out-dir runs/ct_fixed                                          # 16 fixed molecules, quick
    python recipes/consistency_train.py --out-dir runs/ct --resume runs/ct/last.eqx
    python recipes/consistency_train.py --dry-run

Writes config.json, metrics.jsonl, last.eqx (a train_state: --resume it, or sample its EMA model), student.eqx
(a denoiser: the EMA consistency function; the header records the consistency sampler) and result.json.
"""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax.random as jr
import tyro

from sde_mol import cli, schedules
from sde_mol.data.fixed import fixed_molecules
from sde_mol.objectives.consistency import UnbiasedEstimator
from sde_mol.run import consistency as cr, recipe as rr
from sde_mol.run.build import build_consistency_loss, build_denoiser, continuous_teacher
from sde_mol.run.configs import (
    ConsistencyLossConfig,
)
from sde_mol.run.load import load_denoiser

# (s0, s1) of N(k) per curriculum: ict_n's 10 -> 1280 (N = s + 1), song_ct_n's 2 -> 150
CURRICULUM_DEFAULTS = {"ict": (10, 1280), "song": (2, 150)}


@dataclass(frozen=True)
class Config(cr.RunConfig):
    curriculum: Literal["ict", "song"] = "ict"
    """N(k) and target EMA: iCT's doubling N, no target EMA; or Song's square-root N with mu(k)"""
    n_min: int | None = None
    """s0 of the curriculum (None: ict 10, song 2)"""
    n_max: int | None = None
    """s1 of the curriculum (None: ict 1280, song 150); train.steps is the curriculum's length K"""
    mu0: float = 0.9
    """song: the target EMA rate at N = s0 (Song et al.: 0.9)"""
    loss: ConsistencyLossConfig = field(
        default_factory=lambda: ConsistencyLossConfig("pseudo_huber", weighting="inverse_step", index="lognormal")
    )
    molecules: str = "qm9"
    """qm9: the QM9 train split (--data.n-train for its first n); fixed:<n>: the first n train molecules with
    --fixed-atoms atoms under --fixed-rotations rotations (consistency_distill's oracle:<n> data; quick checks)"""
    fixed_atoms: int = 12
    fixed_rotations: int = 8
    init_from: Path | None = None
    """a diffusion checkpoint whose network the student starts from (ECT); None = a new network from --spec"""
    out_dir: Path = Path("runs/ct")


def curriculum(cfg: Config):
    """(N(k), with a target model, target EMA rate mu(k) or None, s0, s1)."""
    d0, d1 = CURRICULUM_DEFAULTS[cfg.curriculum]
    s0, s1, k = cfg.n_min or d0, cfg.n_max or d1, cfg.train.steps
    if not 1 <= s0 <= s1:
        raise ValueError(f"curriculum {cfg.curriculum}: need 1 <= --n-min <= --n-max, got {s0} and {s1}")
    if cfg.curriculum == "ict":
        return eqx.Partial(schedules.ict_n, total_steps=k, s0=s0, s1=s1), False, None, s0, s1
    mu = partial(schedules.song_ct_mu, total_steps=k, s0=s0, s1=s1, mu0=cfg.mu0)
    return eqx.Partial(schedules.song_ct_n, total_steps=k, s0=s0, s1=s1), True, mu, s0, s1


def setup(cfg: Config):
    """(student, its spec, host batch source, TCM boundary model or None)."""
    boundary = None
    if cfg.boundary is not None:
        if cfg.init_from is not None:
            raise ValueError(f"--boundary {cfg.boundary}: the student starts from its network (no --init-from)")
        boundary, spec = cr.load_boundary(cfg.boundary, cfg.truncation_sigma)
        student = boundary
    elif cfg.init_from is not None:
        teacher, spec, _ = load_denoiser(cfg.init_from)
        student, spec = cr.student_from_teacher(*continuous_teacher(teacher, spec))
    else:
        spec = cfg.spec
        cr.check_student_spec(spec)
        student = build_denoiser(spec, key=jr.PRNGKey(cfg.init_seed))
    n = rr.parse_count(cfg.molecules, "fixed", "--molecules")
    if n is not None:
        _, batches = fixed_molecules(
            n, cfg.fixed_atoms, student.sde, rotations=cfg.fixed_rotations, seed=cfg.init_seed,
            batch_size=cfg.data.batch_size, data_seed=cfg.train.seed,
        )  # fmt: skip
    elif cfg.molecules == "qm9":
        batches = rr.qm9_batches(cfg.data, seed=cfg.train.seed)
    else:
        raise ValueError(f"--molecules {cfg.molecules!r}: expected qm9 or fixed:<n>")
    return student, spec, batches, boundary


def main(cfg: Config) -> dict:
    if rr.start(cfg) is None:
        return {}
    n_points, with_target, mu, s0, s1 = curriculum(cfg)
    student, spec, batches, boundary = setup(cfg)
    cut = None if boundary is None else cfg.truncation_sigma
    estimator = UnbiasedEstimator()
    objective = build_consistency_loss(cfg.loss, estimator, n_points, boundary=boundary, boundary_sigma=cut)
    settings = {"curriculum": cfg.curriculum, "s0": s0, "s1": s1, "total_steps": cfg.train.steps}
    return cr.train(
        cfg,
        method="ct",
        objective=objective,
        student=student,
        spec=spec,
        batches=batches,
        with_target=with_target,
        target_decay=mu,
        resume_keys=("curriculum", "n_min", "n_max", "mu0", "loss", "molecules", "init_from", "spec"),
        settings=settings,
        boundary=boundary,
        truncation_sigma=cut,
    )


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
