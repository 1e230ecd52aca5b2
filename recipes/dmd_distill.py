"""Distribution matching distillation (DMD / DMD2, Yin et al. 2024; FlashMol for molecules) of a diffusion model
into a few-step generator: sde_mol/objectives/distribution_matching.py.

The generator and the fake denoiser start as copies of the teacher on the continuous twin of its schedule; the
generator is sampled as the teacher's respaced k-step ancestral chain (DDIM, eta = 1), so training starts from
that training-free sampler and moves its distribution towards the teacher's (or, with --guide.*, the guided
teacher's). The data's molecules are not used, only their sizes.

Usage:
    python recipes/dmd_distill.py --steps 4 --out-dir runs/dmd_4 --train.max-minutes 120 --eval-samples 300
    python recipes/dmd_distill.py --steps 4 --guide.checkpoint checkpoints/edm_qm9_small.eqx --guide.weight 3 \
        --guide.t-high 0.6 --out-dir runs/dmd_4_guided        # match the autoguided teacher's distribution
    python recipes/dmd_distill.py --steps 4 --out-dir runs/dmd_4 --resume runs/dmd_4/last.eqx  # + the same flags
    python recipes/sample.py --checkpoint runs/dmd_4/student_4steps.eqx   # its own sampler: DDIM eta 1, 4 steps

Writes config.json, metrics.jsonl (loss = dmd + fake), last.eqx (the training state of both networks, for
--resume), student_<k>steps.eqx (a denoiser: the EMA generator; its header records the sampler), result.json and,
at the end, carry.eqx: the run's state without what it can rebuild (the fake's EMA, never used, and the fake's
optimiser moments), 18 MB instead of 30 for the QM9 teacher, small enough to commit and carry a run between
machines. --resume takes either: last.eqx continues the run exactly, carry.eqx with the generator, its EMA and its
optimiser state exact and the fake's optimiser restarted (its warm-up included).
With --eval-samples, metrics.jsonl holds the curve: EDM's metrics of the EMA generator (its own sampler, a fixed
seed) before the first step (the teacher's respaced chain), every --train.eval-every steps and at the end.
"""

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import optax
import tyro
from jaxtyping import Array, Int, PyTree

from sde_mol import checkpoint, cli
from sde_mol.data.qm9 import QM9_BUCKETS
from sde_mol.denoisers import AbstractDenoiser
from sde_mol.objectives.distribution_matching import DistributionMatching, GeneratorPair
from sde_mol.run import progressive as rp, recipe as rr
from sde_mol.run.build import optimizer_from
from sde_mol.run.configs import DataConfig, GuideConfig, OptimConfig, SamplerConfig, from_dict, to_dict
from sde_mol.run.load import with_guide
from sde_mol.training.loop import LoopConfig
from sde_mol.training.state import TrainState, count_params, init_state

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "edm_qm9_finetuned.eqx"
KIND = "dmd_train_state"
CARRY_KIND = "dmd_carry_state"


class Carry(eqx.Module):
    """What carry.eqx holds (module docstring): a DMD TrainState less the fake's EMA and optimiser state."""

    generator: AbstractDenoiser
    generator_ema: AbstractDenoiser
    fake: AbstractDenoiser
    generator_opt: PyTree  # the "generator" entry of the multi_transform optimiser state
    step: Int[Array, ""]


def carry_of(state: TrainState) -> Carry:
    return Carry(
        state.model.generator, state.ema_model.generator, state.model.fake,
        state.opt_state.inner_states["generator"], state.step,
    )  # fmt: skip


def state_from(carry: Carry, fresh: TrainState) -> TrainState:
    """A TrainState continuing `carry`: its generator, EMA generator, generator optimiser state and step; the
    fake from `carry`, its EMA a copy of it and its optimiser state `fresh`'s (a new one)."""
    inner = dict(fresh.opt_state.inner_states, generator=carry.generator_opt)
    return TrainState(
        GeneratorPair(carry.generator, carry.fake), GeneratorPair(carry.generator_ema, carry.fake), None,
        fresh.opt_state._replace(inner_states=inner), carry.step,
    )  # fmt: skip


def load_state(path: Path, pair: GeneratorPair) -> TrainState:
    """The TrainState in a last.eqx or carry.eqx of this recipe, its optimiser state shaped by the file's own
    optimiser settings (a carry's fake optimiser state new)."""
    header = checkpoint.read_header(path)
    if header["kind"] not in (KIND, CARRY_KIND):
        raise checkpoint.CheckpointError(
            f"{path}: expected a {KIND} (last.eqx) or {CARRY_KIND} (carry.eqx) of recipes/dmd_distill.py, found "
            f"{header['kind']!r}"
        )
    config = header["config"]
    optimizer = optimizer_for(from_dict(OptimConfig, config["optim"]), config["full"]["fake_lr_scale"])
    like = eqx.filter_eval_shape(init_state, pair, optimizer)
    if header["kind"] == KIND:
        return checkpoint.load(path, like, kind=KIND)
    carry = checkpoint.load(path, eqx.filter_eval_shape(carry_of, like), kind=CARRY_KIND)
    return state_from(carry, init_state(pair, optimizer))


def check_teacher(path: Path, teacher: Path, sha256: str) -> None:
    """Refuse a state distilled from another teacher: by the teacher file's content (sha256), not its path, so a
    committed state continues on another machine; files written before the hash was recorded: by path."""
    stored = checkpoint.read_header(path)["config"]
    sha = stored.get("distillation", {}).get("teacher_sha256")
    if sha is None and stored["full"]["teacher"] != str(teacher):
        raise ValueError(f"{path}: its teacher {stored['full']['teacher']} differs from the requested {teacher}")
    if sha is not None and sha != sha256:
        raise ValueError(
            f"{path}: distilled from another teacher (sha256 {sha[:12]}...) than --teacher {teacher} ({sha256[:12]}...)"
        )


def initial_state(pair: GeneratorPair, optimizer, cfg: "Config", full: dict, sha256: str) -> TrainState:
    """A new DMD state; `cfg.resume`'s (a last.eqx continues exactly, a carry.eqx with the fake's optimiser
    restarted); or `cfg.init_from`'s networks with a new optimiser at step 0."""
    if cfg.resume is not None:
        check_teacher(cfg.resume, cfg.teacher, sha256)
        rr.check_same_run(cfg.resume, full, RUN_KEYS, recorded_later=LATER_KEYS)
        state = load_state(cfg.resume, pair)
        carried = checkpoint.read_header(cfg.resume)["kind"] == CARRY_KIND
        print(f"resumed from {cfg.resume} at step {int(state.step)}" + (" (the fake's optimiser restarts)" * carried))
        return state
    if cfg.init_from is None:
        return init_state(pair, optimizer)
    check_teacher(cfg.init_from, cfg.teacher, sha256)
    rr.check_same_run(cfg.init_from, full, ("steps", "grid"))
    start = load_state(cfg.init_from, pair)
    state = init_state(start.model, optimizer)
    print(f"initialised from {cfg.init_from} (its step {int(start.step)}; new optimiser, step 0)")
    return eqx.tree_at(lambda st: st.ema_model.generator, state, start.ema_model.generator)


RUN_KEYS = (
    "steps", "guide", "t_low", "t_high", "low_noise_fraction", "low_noise_t_max", "fake_lr_scale", "chain_gradient",
    "grid",
)  # fmt: skip
LATER_KEYS = {"low_noise_fraction": 0.0, "low_noise_t_max": 0.1}  # runs from before these existed had these


@dataclass(frozen=True)
class Config:
    teacher: Path = DEFAULT_CHECKPOINT
    """the diffusion model to distil (a denoiser or train_state checkpoint; run on its continuous twin)"""
    steps: int = 4
    """k: the generator's sampling steps (DDIM eta = 1 on --grid; k + 1 network evaluations)"""
    guide: GuideConfig = field(default_factory=GuideConfig)
    """autoguidance of the teacher: the generator then matches the guided model's distribution"""
    grid: Literal["uniform", "karras"] = "karras"
    """the generator's time grid (Karras: rho = 7 in sigma / alpha; the uniform grid's first step from t = 1
    carries an x0 guess made at alpha = 0.003 into the chain, and some chains explode)"""
    chain_gradient: bool = False
    """backpropagate the matching gradient through the whole k-step chain (k times the generator's cost), not
    only through its last step"""
    fake_lr_scale: float = 50.0
    """the fake denoiser's lr is this multiple of --optim.lr (it must keep up with the generator; DMD2 updates it
    five times per generator update). Measured on QM9: generator lr 2e-6 with the fake at 1e-4 ran stably, 2e-5
    with the fake at 1e-4 (and a guided teacher) collapsed the generator within 500 steps"""
    t_low: float = 0.02
    t_high: float = 0.98
    """the diffusion times at which the two distributions are compared (DMD: 2 % to 98 % of the schedule)"""
    low_noise_fraction: float = 0.0
    low_noise_t_max: float = 0.1
    """with probability --low-noise-fraction a level is drawn from U(t_low, low_noise_t_max) instead: more of
    the signal at the levels that resolve bond lengths (where experiments/sample_levels.py finds few-step samples
    furthest from the data); 0: DMD's uniform draw"""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-6, ema_decay=0.999, warmup_steps=100, clip="1.0")
    )
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32, buckets=QM9_BUCKETS))
    """molecule sizes come from the data's batches (their atoms are not used)"""
    train: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            steps=20_000, log_every=50, ckpt_every=500, eval_every=500, eval_at_start=True
        )
    )
    eval_samples: int = 0
    """molecules of the EMA generator scored (same seed each time) before training (--train.eval-at-start),
    every --train.eval-every steps and at the end; 0 = skip"""
    out_dir: Path = Path("runs/dmd")
    resume: Path | None = None
    """a last.eqx (exact) or carry.eqx (the fake's optimiser restarted) of this recipe (same teacher, steps,
    guide and levels) to continue from"""
    init_from: Path | None = None
    """a last.eqx or carry.eqx of this recipe (same teacher, steps and grid) whose generator, EMA generator and
    fake start a new run (new optimiser, step 0): continue a student with other levels, guide or lr"""
    dry_run: bool = False


def scaled(optim: OptimConfig, factor: float) -> OptimConfig:
    return replace(optim, lr=optim.lr * factor, lr_end=optim.lr_end * factor)


def optimizer_for(optim: OptimConfig, fake_lr_scale: float) -> optax.GradientTransformation:
    """`optim` on the generator, the same at `fake_lr_scale` x its lr on the fake."""
    return optax.multi_transform(
        {"generator": optimizer_from(optim), "fake": optimizer_from(scaled(optim, fake_lr_scale))},
        lambda params: eqx.tree_at(
            lambda p: p.fake, jax.tree.map(lambda _: "generator", params), jax.tree.map(lambda _: "fake", params.fake)
        ),
    )


def main(cfg: Config) -> dict:
    if cfg.steps < 1 or not 0.0 <= cfg.t_low < cfg.t_high <= 1.0 or cfg.fake_lr_scale <= 0:
        raise cli.UsageError(
            f"--steps {cfg.steps} / --t-low {cfg.t_low} / --t-high {cfg.t_high} / --fake-lr-scale "
            f"{cfg.fake_lr_scale}: expected steps >= 1, 0 <= t_low < t_high <= 1 and a positive scale"
        )
    low = cfg.low_noise_fraction
    if not 0.0 <= low <= 1.0 or (low > 0 and not cfg.t_low < cfg.low_noise_t_max <= cfg.t_high):
        raise cli.UsageError(
            f"--low-noise-fraction {low} / --low-noise-t-max {cfg.low_noise_t_max}: expected a share in [0, 1] "
            f"and, when it is > 0, t_low < t_max <= t_high ({cfg.t_low}, {cfg.t_high})"
        )
    if cfg.resume is not None and cfg.init_from is not None:
        raise cli.UsageError(
            "--resume and --init-from exclude each other (resume continues a run; init-from starts one)"
        )
    for flag, path in (("--resume", cfg.resume), ("--init-from", cfg.init_from)):
        if path is not None and not Path(path).is_file():
            raise cli.UsageError(f"{flag} {path}: no such file (a last.eqx or carry.eqx of recipes/dmd_distill.py)")
    # the teacher and its guide before start(): a refused --teacher / --guide.* writes nothing
    teacher, spec, _, _ = rr.checkpoint_teacher(cfg.teacher, continuous_time=True, latent_ok=False)
    real = with_guide(teacher, spec, cfg.guide, continuous_time=True)
    full = rr.start(cfg)
    if full is None:
        return {}
    objective = DistributionMatching(
        real, cfg.steps, cfg.t_low, cfg.t_high, chain_gradient=cfg.chain_gradient, grid=cfg.grid,
        low_noise_fraction=cfg.low_noise_fraction, low_noise_t_max=cfg.low_noise_t_max,
    )  # fmt: skip
    sha256 = hashlib.sha256(Path(cfg.teacher).read_bytes()).hexdigest()
    pair = GeneratorPair(rp.copied(teacher), rp.copied(teacher))  # the state's buffers are donated
    sampler = SamplerConfig("ddim", steps=cfg.steps, eta=1.0, grid=cfg.grid)
    distillation = {
        "method": "dmd",
        "teacher": str(cfg.teacher),
        "teacher_sha256": sha256,
        "guide": to_dict(cfg.guide),
        "sampler": to_dict(sampler),
        "t_low": cfg.t_low,
        "t_high": cfg.t_high,
        "low_noise_fraction": cfg.low_noise_fraction,
        "low_noise_t_max": cfg.low_noise_t_max,
        "fake_lr_scale": cfg.fake_lr_scale,
        "chain_gradient": cfg.chain_gradient,
    }
    header = {"recipe": "dmd_distill", "spec": to_dict(spec), "full": full, "distillation": distillation}
    optimizer = optimizer_for(cfg.optim, cfg.fake_lr_scale)
    state = initial_state(pair, optimizer, cfg, full, sha256)
    print(f"dmd: {count_params(state.model.generator):,} generator + fake parameters each; {cfg.steps}-step generator")
    loop = replace(cfg.train, eval_at_start=cfg.train.eval_at_start and cfg.resume is None)  # init-from: its start

    scored = {}  # step -> metrics: the loop's evaluation at its last step is the result's, not redone

    def evaluate(state):  # the EMA generator at its own sampler: the curve in metrics.jsonl
        step = int(state.step)
        if step not in scored:
            scored[step] = rr.score_sampler(
                sampler, state.ema_model.generator, spec, cfg.eval_samples, seed=cfg.train.seed + 2
            )
        return scored[step]

    header = dict(header, optim=to_dict(cfg.optim))
    state = rr.fit(
        state, objective, optimizer, rr.qm9_batches(cfg.data, seed=cfg.train.seed), loop=loop,
        ema_decay=cfg.optim.ema_decay, out_dir=cfg.out_dir, header=header, batch_size=cfg.data.batch_size,
        kind=KIND, evaluate=evaluate if cfg.eval_samples else None,
    )  # fmt: skip
    step = int(state.step)
    checkpoint.save(cfg.out_dir / "carry.eqx", carry_of(state), kind=CARRY_KIND, config=header, step=step)
    path = cfg.out_dir / f"student_{cfg.steps}steps.eqx"
    checkpoint.save(path, state.ema_model.generator, kind="denoiser", config=header, step=step)
    result = {"student": str(path), "carry": str(cfg.out_dir / "carry.eqx"), "step": step}
    if cfg.eval_samples:
        result["student_metrics"] = evaluate(state)
    print(json.dumps(result, indent=2))
    (cfg.out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
