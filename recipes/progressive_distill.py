"""Progressive distillation (Salimans & Ho 2022) of a diffusion model into few-step DDIM students, one
checkpoint per halving; latent (GeoLDM) teachers give Lacombe & Vaidya's equivariant latent progressive
distillation.

Round r distils a 2N-step teacher into an N-step student, N = teacher_steps / 2^(r + 1); the student of round
r is the teacher of round r + 1 and starts from its weights. All rounds run in ONE compiled training step (N
and the round are traced; see sde_mol/objectives/progressive.py).

Usage:
    python recipes/progressive_distill.py --teacher checkpoints/edm_qm9_small.eqx --rounds 6 \
        --teacher-steps 256 --out-dir runs/pd_edm                       # 256 -> 128 -> ... -> 4 steps
    python recipes/sample.py --checkpoint runs/pd_edm/student_4steps.eqx --sampler.sampler ddim --sampler.steps 4
    python recipes/progressive_distill.py --teacher checkpoints/edm_qm9_small.eqx --sampler ddpm --target ddpm \
        --out-dir runs/pd_ddpm              # stochastic teacher; sample with --sampler.eta 1.0
    python recipes/progressive_distill.py --teacher runs/ldm_qm9/last.eqx --out-dir runs/pd_latent
    python recipes/progressive_distill.py --teacher checkpoints/edm_qm9_small.eqx --continuous-time \
        --teacher-steps 1024 --rounds 7 --out-dir runs/pd_1024    # 1024 -> 512 -> ... -> 8 steps
    python recipes/progressive_distill.py --teacher oracle:16 --teacher-steps 16 --rounds 2 \
        --steps-per-round 200 --spec.model.hidden 16 --spec.model.n-layers 2 --out-dir runs/pd_oracle
    python recipes/progressive_distill.py --teacher checkpoints/edm_qm9_small.eqx --out-dir runs/pd_edm \
        --resume runs/pd_edm/last.eqx
    python recipes/progressive_distill.py --dry-run

Writes config.json, metrics.jsonl, last.eqx (the training state, for --resume), student_<N>steps.eqx after
each round (a "denoiser", or for latent teachers a "latent_denoiser" embedding the autoencoder; the header
records the SDE, the step count and the DDIM eta to sample it with) and students.json (one line per round).
"""

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax.random as jr
import optax
import tyro

from sde_mol import checkpoint, cli, metrics
from sde_mol.data.fixed import fixed_molecules
from sde_mol.data.loader import BatchIterator
from sde_mol.data.qm9 import load_qm9
from sde_mol.latent import LatentObjective, LatentSampler, is_latent, load_latent
from sde_mol.objectives.progressive import HalvingSchedule, ProgressiveDistillation
from sde_mol.run.build import build_denoiser, build_sampler, continuous_teacher, dataset_info, optimizer_from
from sde_mol.run.configs import DataConfig, DenoiserConfig, ModelConfig, ModelSpec, OptimConfig, SamplerConfig, to_dict
from sde_mol.run.load import load_denoiser
from sde_mol.samplers import sample_molecules
from sde_mol.training.loop import LoopConfig, run_loop
from sde_mol.training.prefetch import host_batches, to_device as batch_to_device
from sde_mol.training.state import compute_dtype_from, count_params, init_state, make_step

ETA = {"ddim": 0.0, "ddpm": 1.0}

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "edm_qm9_base.eqx"


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
    sampler: Literal["ddim", "ddpm"] = "ddim"
    """the teacher's two steps: deterministic DDIM (Salimans & Ho) or stochastic DDPM ancestral steps"""
    target: Literal["ddim", "ddpm"] = "ddim"
    """the student step the target is solved for: ddim (a deterministic student; with --sampler ddpm this is
    Lacombe & Vaidya's 'as if deterministic'), or ddpm (an ancestral student: sample it with --sampler.eta 1)"""
    continuous_time: bool = False
    """run the teacher (and so its student copies) on the continuous twin of a discrete schedule (EDM's
    vp_discrete -> vp_polynomial, `run.build.continuous_teacher`): any --teacher-steps then works, e.g. 1024 -> 8
    in 7 rounds (the discrete table resolves at most its 1000 levels); the students record vp_polynomial"""
    eval_max_steps: int | None = None
    """with --eval-samples: score only the students of at most this many steps (None: every round)"""
    lr_decay: bool = True
    """decay the learning rate linearly to 0 within each round (Salimans & Ho)"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, ema_decay=0.0, clip="1.0"))
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=64, buckets=(17, 20, 23, 29)))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(log_every=100, ckpt_every=1000))
    """loop settings; train.steps is ignored (rounds x steps_per_round); train.max_minutes bounds the whole run"""
    spec: ModelSpec = field(
        default_factory=lambda: ModelSpec(ModelConfig(hidden=64, n_layers=4), denoiser=DenoiserConfig("karras", 1.0))
    )
    """the student of an oracle teacher (a checkpoint's student is a copy of the teacher). Karras
    preconditioning by default: an eps student's x0 = (z - sigma eps) / alpha amplifies its errors by 1 / alpha
    (~316 at t = 1 for EDM's schedule), which Salimans & Ho report as unusable for few-step students"""
    oracle_atoms: int = 12
    """oracle:<n> takes molecules of this size (one node mask)"""
    oracle_rotations: int = 8
    """oracle:<n> holds each molecule under this many fixed random rotations (1 = as stored)"""
    eval_samples: int = 0
    """molecules sampled (DDIM at the round's step count) and scored after each round; 0 = skip"""
    out_dir: Path = Path("runs/progressive")
    resume: Path | None = None
    """a last.eqx of this recipe (same teacher and schedule) to continue from"""
    init_seed: int = 0
    dry_run: bool = False


def oracle_setup(cfg: Config, n: int):
    """(oracle teacher, student, spec, no autoencoder, no header additions, host batch source) for oracle:<n>."""
    student = build_denoiser(cfg.spec, key=jr.PRNGKey(cfg.init_seed))
    try:
        oracle, batches = fixed_molecules(
            n, cfg.oracle_atoms, student.sde, rotations=cfg.oracle_rotations, seed=cfg.init_seed,
            batch_size=cfg.data.batch_size, data_seed=cfg.train.seed,
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"--teacher oracle:{n}: {e}") from None
    return oracle, student, cfg.spec, None, {}, batches


def checkpoint_setup(cfg: Config, path: Path):
    """(None, student = the teacher's copy, spec, autoencoder or None, header additions, host batch source)
    for a checkpoint teacher."""
    if not path.is_file():
        raise FileNotFoundError(f"--teacher {path} does not exist (a checkpoint path, or oracle:<n>)")
    extra = {}
    if is_latent(checkpoint.read_header(path)):
        teacher, autoencoder, spec, header = load_latent(path)
        extra = {"latent": True, "autoencoder": header["config"]["autoencoder"]}
    else:
        (teacher, spec, _), autoencoder = load_denoiser(path), None
    if cfg.continuous_time:
        teacher, spec = continuous_teacher(teacher, spec)
    info = dataset_info(spec.dataset)
    train = load_qm9("train")
    if cfg.data.n_train is not None:
        train = train.subset(slice(0, cfg.data.n_train))
    iterator = BatchIterator(train, info, cfg.data.batch_size, seed=cfg.train.seed, buckets=cfg.data.buckets)
    return None, teacher, spec, autoencoder, extra, lambda start: host_batches(iterator, start)


def build_optimizer(cfg: Config) -> optax.GradientTransformation:
    base = optimizer_from(cfg.optim)
    if not cfg.lr_decay:
        return base
    s = cfg.steps_per_round
    return optax.chain(base, optax.scale_by_schedule(lambda count: 1.0 - (count % s) / s))


def main(cfg: Config) -> list[dict]:
    schedule = HalvingSchedule(cfg.teacher_steps, cfg.steps_per_round, cfg.rounds)  # validates the grid
    print(json.dumps(to_dict(cfg), indent=2, default=str))
    if cfg.dry_run:
        return []
    if cfg.teacher.startswith("oracle:"):
        n = cfg.teacher.removeprefix("oracle:")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--teacher {cfg.teacher!r}: expected oracle:<n> with a positive integer n")
        oracle, student, spec, autoencoder, extra, batches = oracle_setup(cfg, int(n))
    else:
        oracle, student, spec, autoencoder, extra, batches = checkpoint_setup(cfg, Path(cfg.teacher))
    sde = student.sde
    if sde.time_resolution is not None and cfg.teacher_steps > sde.time_resolution:
        raise ValueError(
            f"--teacher-steps {cfg.teacher_steps}: finer than the teacher's discrete schedule of {sde.time_resolution} "
            "steps (its grid nodes would repeat); add --continuous-time to distil on its continuous twin"
        )
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    objective = ProgressiveDistillation(
        sde, schedule, oracle, teacher_eta=ETA[cfg.sampler], student_eta=ETA[cfg.target]
    )
    if autoencoder is not None:
        objective = LatentObjective(objective, autoencoder)
    optimizer = build_optimizer(cfg)
    full = json.loads(json.dumps(to_dict(cfg), default=str))
    hcfg = {"recipe": "progressive_distill", "spec": to_dict(spec), **extra, "full": full}
    if cfg.resume is not None:
        stored = checkpoint.read_header(cfg.resume)["config"].get("full", {})
        for key in ("teacher", "rounds", "teacher_steps", "steps_per_round", "sampler", "target", "continuous_time"):
            if stored.get(key) != hcfg["full"][key]:
                raise ValueError(
                    f"{cfg.resume}: its {key} {stored.get(key)!r} differs from the requested {hcfg['full'][key]!r}"
                )
        like = eqx.filter_eval_shape(lambda: init_state(student, optimizer, with_target=True))
        state = checkpoint.load(cfg.resume, like, kind="progressive_train_state")
        print(f"resumed from {cfg.resume} at step {int(state.step)}")
    else:
        state = init_state(student, optimizer, with_target=True)  # the student starts as its teacher
    print(
        f"student parameters: {count_params(state.model):,}; rounds {cfg.rounds}: {cfg.teacher_steps} -> "
        f"{schedule.steps_of_round(cfg.rounds - 1)} steps"
    )
    step_fn = make_step(
        objective,
        optimizer,
        ema_decay=cfg.optim.ema_decay,
        target_decay=schedule.target_decay,
        donate=True,
        compute_dtype=compute_dtype_from(cfg.train.precision),
    )

    def save_state(path, st):
        checkpoint.save(path, st, kind="progressive_train_state", config=hcfg, step=int(st.step))

    deadline = time.perf_counter() + 60 * cfg.train.max_minutes if cfg.train.max_minutes else None
    summary = []
    for r in range(int(state.step) // cfg.steps_per_round, cfg.rounds):
        end = (r + 1) * cfg.steps_per_round
        minutes = None if deadline is None else max((deadline - time.perf_counter()) / 60, 1e-3)
        loop = replace(cfg.train, steps=end, max_minutes=minutes)
        state = run_loop(
            state,
            step_fn,
            batches,
            cfg=loop,
            out_dir=cfg.out_dir,
            save=save_state,
            batch_size=cfg.data.batch_size,
            to_device=batch_to_device,
        )
        if int(state.step) < end:
            print(f"stopped in round {r} at step {int(state.step)}; resume with --resume {cfg.out_dir / 'last.eqx'}")
            break
        summary.append(save_student(cfg, r, schedule, state.model, spec, autoencoder, hcfg, int(state.step)))
    return summary


def save_student(cfg: Config, r: int, schedule, den, spec, autoencoder, hcfg: dict, step: int) -> dict:
    """Write round r's student (the next round's teacher) and, with --eval-samples, score its DDIM samples."""
    n = schedule.steps_of_round(r)
    sampler = SamplerConfig("ddim", steps=n, eta=ETA[cfg.target])
    config = dict(
        hcfg,
        distillation={
            "round": r,
            "student_steps": n,
            "sampler": to_dict(sampler),
            "teacher": cfg.teacher,
            "teacher_sampler": cfg.sampler,
            "target": cfg.target,
        },
    )
    path = cfg.out_dir / f"student_{n}steps.eqx"
    if autoencoder is None:
        checkpoint.save(path, den, kind="denoiser", config=config, step=step)
    else:
        checkpoint.save(path, (den, autoencoder), kind="latent_denoiser", config=config, step=step)
    row = {"round": r, "student_steps": n, "checkpoint": str(path), "step": step}
    if cfg.eval_samples and (cfg.eval_max_steps is None or n <= cfg.eval_max_steps):
        info = dataset_info(spec.dataset)
        fn = build_sampler(sampler, den, info.n_feat if autoencoder is None else autoencoder.latent_channels)
        fn = fn if autoencoder is None else LatentSampler(fn, autoencoder)
        res = sample_molecules(
            fn, cfg.eval_samples, info, key=jr.PRNGKey(cfg.train.seed + 2), batch_size=cfg.eval_samples
        )
        m = metrics.evaluate_samples(res, None, atom_decoder=info.atom_decoder)
        row.update({k: v for k, v in m.items() if v is not None})
    print(
        f"round {r}: wrote {path}" + "".join(f"; {k} {v}" for k, v in row.items() if k not in ("checkpoint", "round"))
    )
    with open(cfg.out_dir / "students.json", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
