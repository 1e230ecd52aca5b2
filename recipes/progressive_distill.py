"""Progressive distillation (Salimans & Ho 2022) of a diffusion model into few-step DDIM students, one
checkpoint per halving; latent (GeoLDM) teachers give Lacombe & Vaidya's equivariant latent progressive
distillation.

Round r distils a 2N-step teacher into an N-step student, N = teacher_steps / 2^(r + 1); the student of round
r is the teacher of round r + 1 and starts from its weights. All rounds run in ONE compiled training step (N
and the round are traced; see sde_mol/objectives/progressive.py).

Usage (checkpoints/student_pd.md: the shipped students and their run):
    python recipes/progressive_distill.py --teacher checkpoints/edm_qm9_finetuned.eqx --continuous-time \
        --teacher-steps 256 --rounds 6 --steps-per-round 400 --eval-samples 500 --out-dir runs/pd_qm9  # 256 -> 4
    python recipes/progressive_distill.py --out-dir runs/pd_qm9 --resume runs/pd_qm9/last.eqx  # + the same flags
    python recipes/sample.py --checkpoint runs/pd_qm9/student_4steps.eqx          # DDIM at its own 4 steps
    python recipes/progressive_distill.py --teacher runs/pd_qm9/student_64steps.eqx --teacher-steps 64 --rounds 4 \
        --steps-per-round 400 --trajectory.fraction 0.5 --out-dir runs/pd_traj  # half the states from the chains
    python recipes/progressive_distill.py --continuous-time --teacher-steps 64 --rounds 4 --guide.checkpoint \
        checkpoints/edm_qm9_small.eqx --guide.weight 3 --guide.t-high 0.6 --out-dir runs/pd_guided  # guided round 0
    python recipes/progressive_distill.py --teacher runs/ldm_qm9/last.eqx --out-dir runs/pd_latent
    python recipes/progressive_distill.py --teacher oracle:16 --teacher-steps 16 --rounds 2 \
        --steps-per-round 200 --spec.model.hidden 16 --spec.model.n-layers 2 --out-dir runs/pd_oracle

Writes config.json, metrics.jsonl, last.eqx (the training state, for --resume), student_<N>steps.eqx after
each round (a "denoiser", or for latent teachers a "latent_denoiser" embedding the autoencoder; the header
records the SDE, the step count and the DDIM eta to sample it with) and students.json (one line per round).
"""

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import tyro

from sde_mol import cli
from sde_mol.data.qm9 import QM9_BUCKETS
from sde_mol.latent import LatentObjective
from sde_mol.objectives.progressive import HalvingSchedule, ProgressiveDistillation
from sde_mol.run import progressive as rp, recipe as rr
from sde_mol.run.build import dataset_info, optimizer_from
from sde_mol.run.configs import DataConfig, DenoiserConfig, GuideConfig, ModelConfig, ModelSpec, OptimConfig, to_dict
from sde_mol.run.load import with_guide
from sde_mol.training.loop import LoopConfig
from sde_mol.training.state import count_params

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "edm_qm9_finetuned.eqx"


@dataclass(frozen=True)
class Config:
    teacher: str = str(DEFAULT_CHECKPOINT)
    """an sde_mol checkpoint (denoiser; train_state: its EMA model; latent model), or oracle:<n>: the exact
    denoiser of the first n QM9 training molecules with --oracle-atoms atoms (an EGNN student from --spec)"""
    rounds: int = 6
    """halvings: the last student takes teacher_steps / 2^rounds steps"""
    teacher_steps: int = 256
    """DDIM steps of the first teacher; round r's student takes teacher_steps / 2^(r+1) (divisible by 2^rounds)"""
    steps_per_round: int = 5000
    """optimiser steps per halving (Salimans & Ho: 50k on CIFAR-10)"""
    sampler: Literal["ddim", "ddpm", "ddpm_mean"] = "ddim"
    """the teacher's two steps: deterministic DDIM (Salimans & Ho), stochastic DDPM ancestral steps, or the means of
    DDPM steps (with --target ddpm: the mean-path target, sde_mol/objectives/progressive.py)"""
    target: Literal["ddim", "ddpm"] = "ddim"
    """the student step the target is solved for: ddim (a deterministic student; with --sampler ddpm this is
    Lacombe & Vaidya's 'as if deterministic'), or ddpm (an ancestral student: sample it with --sampler.eta 1)"""
    eps_below_snr: float = 0.0
    """below this SNR the loss is the eps error (e.g. 0.01: the draws at t ~ 1 of EDM's schedule, where an eps
    student's x0 error is ~316 x its eps error); 0 = Salimans & Ho's truncated-SNR weight everywhere"""
    trajectory: rp.TrajectoryConfig = field(default_factory=rp.TrajectoryConfig)
    """training states from the teachers' own sampling chains as well as noised data"""
    guide: GuideConfig = field(default_factory=GuideConfig)
    """autoguidance of the first teacher (a checkpoint) by a weaker model: round 0 distils the guided teacher;
    the student still starts as a copy of the (unguided) teacher"""
    continuous_time: bool = False
    """run the teacher (and so its student copies) on the continuous twin of a discrete schedule (EDM's
    vp_discrete -> vp_polynomial, `run.build.continuous_teacher`): any --teacher-steps then works, e.g. 1024 -> 8
    in 7 rounds (the discrete table resolves at most its 1000 levels); the students record vp_polynomial"""
    eval_max_steps: int | None = None
    """with --eval-samples: score only the students of at most this many steps (None: every round)"""
    lr_decay: bool = True
    """decay the learning rate linearly to 0 within each round (Salimans & Ho)"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, ema_decay=0.0, clip="1.0"))
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=64, buckets=QM9_BUCKETS))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(log_every=100, ckpt_every=1000))
    """loop settings; train.steps is ignored (rounds x steps_per_round); train.max_minutes bounds the whole run"""
    spec: ModelSpec = field(
        default_factory=lambda: ModelSpec(ModelConfig(hidden=64, n_layers=4), denoiser=DenoiserConfig("karras", 1.0))
    )
    """the student of an oracle teacher (a checkpoint's student is a copy of the teacher); Karras preconditioning
    by default: an eps student's x0 amplifies its errors by 1 / alpha (~316 at t = 1 for EDM's schedule)"""
    oracle_atoms: int = 12
    """oracle:<n> takes molecules of this size (one node mask)"""
    oracle_rotations: int = 8
    """oracle:<n> holds each molecule under this many fixed random rotations (1 = as stored)"""
    eval_samples: int = 0
    """the probe: molecules of each student (DDIM at its step count) and of its teacher (at twice that), same
    seed, scored after each round; students.json says whether the student matched its teacher; 0 = skip"""
    out_dir: Path = Path("runs/progressive")
    resume: Path | None = None
    """a last.eqx of this recipe (same teacher and schedule) to continue from"""
    init_seed: int = 0
    dry_run: bool = False


def main(cfg: Config) -> list[dict]:
    schedule = HalvingSchedule(cfg.teacher_steps, cfg.steps_per_round, cfg.rounds)  # validates the grid
    full = rr.start(cfg)
    if full is None:
        return []
    n = rr.parse_count(cfg.teacher, "oracle", "--teacher")
    if n is not None:
        fixed, student, batches = rr.oracle_teacher(
            n, cfg.spec, atoms=cfg.oracle_atoms, rotations=cfg.oracle_rotations, init_seed=cfg.init_seed,
            data=cfg.data, data_seed=cfg.train.seed,
        )  # fmt: skip
        spec, autoencoder, extra = cfg.spec, None, {}
    else:  # the student starts as a copy of the teacher
        fixed, batches = None, rr.qm9_batches(cfg.data, seed=cfg.train.seed)  # round 0 teaches from the target
        student, spec, autoencoder, extra = rr.checkpoint_teacher(
            Path(cfg.teacher), continuous_time=cfg.continuous_time, latent_ok=True
        )
        if cfg.guide.checkpoint is not None:  # round 0's teacher: a guided copy (the state's buffers are donated)
            if autoencoder is not None:
                raise cli.UsageError(f"--guide.checkpoint: the teacher {cfg.teacher} is a latent model")
            fixed = with_guide(rp.copied(student), spec, cfg.guide, continuous_time=cfg.continuous_time)
    sde, etas = rp.check_resolution(student.sde, cfg.teacher_steps), (rp.ETA[cfg.sampler], rp.ETA[cfg.target])
    objective = pd = ProgressiveDistillation(sde, schedule, fixed, *etas, cfg.eps_below_snr, cfg.sampler != "ddpm_mean")
    if autoencoder is not None:
        objective = LatentObjective(pd, autoencoder)
    optimizer = rp.halving_optimizer(optimizer_from(cfg.optim), cfg.steps_per_round if cfg.lr_decay else None)
    distillation = {"teacher": cfg.teacher, "teacher_sampler": cfg.sampler, "target": cfg.target}
    distillation |= {
        "eps_below_snr": cfg.eps_below_snr,
        "trajectory": to_dict(cfg.trajectory),
        "guide": to_dict(cfg.guide),
    }
    hcfg = {"recipe": "progressive_distill", "spec": to_dict(spec), **extra, "full": full, "distillation": distillation}
    teacher_kw = dict(first_teacher=None if n is not None else Path(cfg.teacher),
                      continuous_time=cfg.continuous_time, teacher_step=cfg.sampler, guide=cfg.guide)  # fmt: skip
    keys = ("teacher", "rounds", "teacher_steps", "steps_per_round", "sampler", "target", "continuous_time")
    keys += ("eps_below_snr", "trajectory", "guide")
    state = rr.initial_state(
        student, optimizer, with_target=True, resume=cfg.resume, full=full, keys=keys, kind="progressive_train_state"
    )
    print(f"student parameters: {count_params(state.model):,}; rounds {cfg.rounds}: {cfg.teacher_steps} -> "
          f"{schedule.steps_of_round(cfg.rounds - 1)} steps")  # fmt: skip
    deadline = time.perf_counter() + 60 * cfg.train.max_minutes if cfg.train.max_minutes else None
    summary = []
    n_feat = dataset_info(cfg.data.dataset).n_feat if autoencoder is None else autoencoder.latent_channels
    for r in range(int(state.step) // cfg.steps_per_round, cfg.rounds):
        start, end, n_steps = r * cfg.steps_per_round, (r + 1) * cfg.steps_per_round, schedule.steps_of_round(r)
        minutes = None if deadline is None else max((deadline - time.perf_counter()) / 60, 1e-3)
        teacher = fixed if r == 0 and fixed is not None else state.target_model  # the round's teacher
        round_data = rp.round_batches(batches, pd, teacher, cfg.trajectory, n_steps=n_steps, round_start=start,
                                      n_feat=n_feat, seed=cfg.train.seed + 3)  # fmt: skip
        state = rr.fit(
            state, objective, optimizer, round_data, loop=replace(cfg.train, steps=end, max_minutes=minutes),
            ema_decay=cfg.optim.ema_decay, target_decay=schedule.target_decay, out_dir=cfg.out_dir, header=hcfg,
            batch_size=cfg.data.batch_size, kind="progressive_train_state",
        )  # fmt: skip
        if int(state.step) < end:
            print(f"stopped in round {r} at step {int(state.step)}; resume with --resume {cfg.out_dir / 'last.eqx'}")
            break
        probe = cfg.eval_samples if cfg.eval_max_steps is None or n_steps <= cfg.eval_max_steps else 0
        summary.append(rp.finish_round(
            cfg.out_dir, n_steps, state.model, spec, autoencoder, header=hcfg, step=int(state.step), round_index=r,
            target=cfg.target, probe=probe, teacher_kw=teacher_kw, seed=cfg.train.seed + 2,
        ))  # fmt: skip
    return summary


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
