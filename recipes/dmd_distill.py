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
--resume), student_<k>steps.eqx (a denoiser: the EMA generator; its header records the sampler) and result.json.
With --eval-samples, metrics.jsonl holds the curve: EDM's metrics of the EMA generator (its own sampler, a fixed
seed) before the first step (the teacher's respaced chain), every --train.eval-every steps and at the end.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import optax
import tyro

from sde_mol import checkpoint, cli
from sde_mol.data.qm9 import QM9_BUCKETS
from sde_mol.objectives.distribution_matching import DistributionMatching, GeneratorPair
from sde_mol.run import progressive as rp, recipe as rr
from sde_mol.run.build import optimizer_from
from sde_mol.run.configs import DataConfig, GuideConfig, OptimConfig, SamplerConfig, to_dict
from sde_mol.run.load import with_guide
from sde_mol.training.loop import LoopConfig
from sde_mol.training.state import count_params

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "edm_qm9_finetuned.eqx"
KIND = "dmd_train_state"


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
    """a last.eqx of this recipe (same teacher, steps, guide and levels) to continue from"""
    dry_run: bool = False


def scaled(optim: OptimConfig, factor: float) -> OptimConfig:
    return replace(optim, lr=optim.lr * factor, lr_end=optim.lr_end * factor)


def main(cfg: Config) -> dict:
    if cfg.steps < 1 or not 0.0 <= cfg.t_low < cfg.t_high <= 1.0 or cfg.fake_lr_scale <= 0:
        raise cli.UsageError(
            f"--steps {cfg.steps} / --t-low {cfg.t_low} / --t-high {cfg.t_high} / --fake-lr-scale "
            f"{cfg.fake_lr_scale}: expected steps >= 1, 0 <= t_low < t_high <= 1 and a positive scale"
        )
    # the teacher and its guide before start(): a refused --teacher / --guide.* writes nothing
    teacher, spec, _, _ = rr.checkpoint_teacher(cfg.teacher, continuous_time=True, latent_ok=False)
    real = with_guide(teacher, spec, cfg.guide, continuous_time=True)
    full = rr.start(cfg)
    if full is None:
        return {}
    objective = DistributionMatching(
        real, cfg.steps, cfg.t_low, cfg.t_high, chain_gradient=cfg.chain_gradient, grid=cfg.grid
    )
    pair = GeneratorPair(rp.copied(teacher), rp.copied(teacher))  # the state's buffers are donated
    sampler = SamplerConfig("ddim", steps=cfg.steps, eta=1.0, grid=cfg.grid)
    distillation = {
        "method": "dmd",
        "teacher": str(cfg.teacher),
        "guide": to_dict(cfg.guide),
        "sampler": to_dict(sampler),
        "t_low": cfg.t_low,
        "t_high": cfg.t_high,
        "fake_lr_scale": cfg.fake_lr_scale,
        "chain_gradient": cfg.chain_gradient,
    }
    header = {"recipe": "dmd_distill", "spec": to_dict(spec), "full": full, "distillation": distillation}
    optimizer = optax.multi_transform(
        {"generator": optimizer_from(cfg.optim), "fake": optimizer_from(scaled(cfg.optim, cfg.fake_lr_scale))},
        lambda params: eqx.tree_at(
            lambda p: p.fake, jax.tree.map(lambda _: "generator", params), jax.tree.map(lambda _: "fake", params.fake)
        ),
    )
    keys = ("teacher", "steps", "guide", "t_low", "t_high", "fake_lr_scale", "chain_gradient", "grid")
    state = rr.initial_state(pair, optimizer, with_target=False, resume=cfg.resume, full=full, keys=keys, kind=KIND)
    print(f"dmd: {count_params(state.model.generator):,} generator + fake parameters each; {cfg.steps}-step generator")
    loop = replace(cfg.train, eval_at_start=cfg.train.eval_at_start and cfg.resume is None)

    scored = {}  # step -> metrics: the loop's evaluation at its last step is the result's, not redone

    def evaluate(state):  # the EMA generator at its own sampler: the curve in metrics.jsonl
        step = int(state.step)
        if step not in scored:
            scored[step] = rr.score_sampler(
                sampler, state.ema_model.generator, spec, cfg.eval_samples, seed=cfg.train.seed + 2
            )
        return scored[step]

    state = rr.fit(
        state, objective, optimizer, rr.qm9_batches(cfg.data, seed=cfg.train.seed), loop=loop,
        ema_decay=cfg.optim.ema_decay, out_dir=cfg.out_dir, header=dict(header, optim=to_dict(cfg.optim)),
        batch_size=cfg.data.batch_size, kind=KIND, evaluate=evaluate if cfg.eval_samples else None,
    )  # fmt: skip
    path = cfg.out_dir / f"student_{cfg.steps}steps.eqx"
    checkpoint.save(path, state.ema_model.generator, kind="denoiser", config=header, step=int(state.step))
    result = {"student": str(path), "step": int(state.step)}
    if cfg.eval_samples:
        result["student_metrics"] = evaluate(state)
    print(json.dumps(result, indent=2))
    (cfg.out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
