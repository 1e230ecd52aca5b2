"""Train an E(3)-equivariant diffusion model (EDM) on QM9.

Usage:
    python recipes/train_edm.py qm9-small --out-dir runs/edm_small
    python recipes/train_edm.py qm9-small --out-dir runs/edm_small --train.max-minutes 60
    python recipes/train_edm.py qm9-small --out-dir runs/edm_small --resume runs/edm_small/last.eqx
    python recipes/train_edm.py qm9-paper --out-dir runs/edm_paper          # EDM's released configuration
    python recipes/train_edm.py qm9-finetune-low-noise --train.max-minutes 110   # low-noise fine-tune of the default
    python recipes/train_edm.py qm9-small --dry-run                          # print the resolved config

Writes config.json, metrics.jsonl (one JSON object per line), last.eqx (every --train.ckpt-every steps and at the
end) and best.eqx (best validation NLL) into --out-dir. Checkpoints are train_state files: sampling recipes
read their EMA model.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from sde_mol import cli
from sde_mol.compile_cache import enable_compile_cache
from sde_mol.data.qm9 import QM9_BUCKETS
from sde_mol.objectives.denoising import EDMEpsLoss
from sde_mol.run import recipe as rr
from sde_mol.run.build import dataset_info, optimizer_from
from sde_mol.run.configs import (
    DataConfig,
    DenoiserConfig,
    EpsLossConfig,
    EvalConfig,
    ModelConfig,
    ModelSpec,
    OptimConfig,
    SamplerConfig,
    SDEConfig,
    to_dict,
)
from sde_mol.training import distributed
from sde_mol.training.loop import LoopConfig
from sde_mol.training.state import count_params


@dataclass(frozen=True)
class Config:
    spec: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: EpsLossConfig = field(default_factory=EpsLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: Path = Path("runs/edm")
    resume: Path | None = None
    """a last.eqx/best.eqx train_state checkpoint to continue from (its config must match)"""
    init_from: Path | None = None
    """warm start (fine-tuning): any checkpoint holding a denoiser (its EMA model) with the same network and
    parametrisation; the SDE may differ (e.g. T = 200 -> 1000: the network is carried over). Model and EMA start
    from it, the optimiser state is fresh and the step count continues from its header's step"""
    init_seed: int = 0
    compile_cache: bool = True
    """use JAX's persistent compilation cache (sde_mol/compile_cache.py): a resumed run skips compilation"""
    dry_run: bool = False


FINETUNE = Config(
    spec=ModelSpec(ModelConfig(hidden=128, n_layers=5), SDEConfig(timesteps=1000), DenoiserConfig()),
    optim=OptimConfig(lr=2e-5, ema_decay=0.999, warmup_steps=300, decay_steps=15_000, lr_end=2e-6),
    data=DataConfig(batch_size=64, buckets=QM9_BUCKETS),
    train=LoopConfig(steps=15_300, eval_every=5000, ckpt_every=500, log_every=100, eval_at_start=True),
    eval=EvalConfig(
        n_valid=1000, n_samples=500, sampler=SamplerConfig(sampler="reverse_sde", steps=250), batch_size=250
    ),
    out_dir=Path("runs/edm_qm9_finetune"),
)
"""The fine-tune of an imported EDM model at 5 layers x 128 (pass --init-from)."""

PRESETS = {
    "qm9-paper": (
        "EDM's released QM9 model: 9 layers, 256 hidden, polynomial_2, T=1000, lr 1e-4, batch 64, EMA 0.9999",
        Config(
            spec=ModelSpec(ModelConfig(hidden=256, n_layers=9), SDEConfig(), DenoiserConfig()),
            train=LoopConfig(steps=1_565_000, eval_every=31_260, ckpt_every=5000, log_every=100),
            out_dir=Path("runs/edm_qm9_paper"),
        ),
    ),
    "qm9-finetune": (
        "fine-tune an imported EDM model (5 layers, 128 hidden; pass --init-from) at T=1000: lr warm-up to 2e-5, "
        "cosine decay to 2e-6, EMA 0.999 from the imported weights, batch 64, eps error per level + 500 molecules",
        FINETUNE,
    ),
    "qm9-finetune-low-noise": (
        "continue the fine-tuned default model with half of each batch at t <= 0.1 (a low-noise-weighted loss): "
        "8,000 steps, lr warm-up to 2e-5 and cosine decay to 2e-6, EMA 0.999 from its weights, eps error per level",
        dataclasses.replace(
            FINETUNE,
            optim=dataclasses.replace(FINETUNE.optim, warmup_steps=200, decay_steps=7_800),
            loss=EpsLossConfig(low_noise_fraction=0.5, low_noise_t_max=0.1),
            train=LoopConfig(steps=15_300 + 8_000, eval_every=2000, ckpt_every=500, log_every=100),
            eval=EvalConfig(n_valid=1000, n_samples=0),
            init_from=Path("checkpoints/edm_qm9_finetuned.eqx"),
            out_dir=Path("runs/edm_qm9_finetune_low_noise"),
        ),
    ),
    "qm9-small": (
        "fastest-learning configuration on a 2-core CPU: 4 layers, 64 hidden, lr 5e-4, EMA 0.999",
        Config(
            spec=ModelSpec(ModelConfig(hidden=64, n_layers=4), SDEConfig(), DenoiserConfig()),
            optim=OptimConfig(lr=5e-4, ema_decay=0.999),
            data=DataConfig(batch_size=64, buckets=QM9_BUCKETS),
            train=LoopConfig(steps=200_000, eval_every=5000, ckpt_every=1000, log_every=100),
            eval=EvalConfig(n_valid=500, n_samples=200),
            out_dir=Path("runs/edm_qm9_small"),
        ),
    ),
}


def main(cfg: Config) -> None:
    distributed.initialise()  # multi-host runs only (see sde_mol/training/distributed.py); a no-op otherwise
    optimizer = optimizer_from(cfg.optim)
    hcfg = {"recipe": "train_edm", "spec": to_dict(cfg.spec), "optim": to_dict(cfg.optim), "with_target": False}
    if cfg.loss != EpsLossConfig():  # EDM's loss leaves headers as they were
        hcfg["loss"] = to_dict(cfg.loss)
    state = rr.diffusion_state(  # before start(): a refused --resume / --init-from writes nothing
        cfg.spec, optimizer, hcfg, resume=cfg.resume, init_from=cfg.init_from, init_seed=cfg.init_seed
    )
    hcfg["full"] = full = rr.start(cfg)
    if full is None:
        return
    enable_compile_cache(cfg.compile_cache)
    info = dataset_info(cfg.data.dataset)
    print(f"trainable parameters: {count_params(state.model):,}")
    rr.fit(
        state,
        EDMEpsLoss(info, timesteps=cfg.spec.sde.timesteps, **to_dict(cfg.loss)),
        optimizer,
        rr.qm9_batches(cfg.data, seed=cfg.train.seed),
        loop=cfg.train if cfg.resume is None else dataclasses.replace(cfg.train, eval_at_start=False),
        ema_decay=cfg.optim.ema_decay,
        out_dir=cfg.out_dir,
        header=hcfg,
        batch_size=cfg.data.batch_size,
        evaluate=rr.diffusion_evaluator(cfg.eval, info, seed=cfg.train.seed)
        if cfg.eval.n_valid or cfg.eval.n_samples
        else None,
        best_key="val_eps_mse" if cfg.eval.n_valid and cfg.eval.levels else "val_nll",
    )


if __name__ == "__main__":
    cli.run(main, lambda: tyro.extras.overridable_config_cli(PRESETS))
