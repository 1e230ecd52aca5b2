"""Train an equivariant latent diffusion model (GeoLDM, Xu et al. 2023) on the latents of a trained autoencoder.

The diffusion model is the library's ordinary denoiser (EGNN, SDE, parametrisation from --spec) built with
n_feat = the autoencoder's latent channels; the objective is the continuous-time eps-L2 loss
(`ContinuousDenoisingLoss`) run on z = mu + s eps of each training molecule (`latent.LatentObjective`).

Usage:
    python recipes/train_autoencoder.py --out-dir runs/ae_qm9                      # the first stage
    python recipes/train_latent.py --autoencoder runs/ae_qm9/autoencoder.eqx --out-dir runs/ldm_qm9
    python recipes/train_latent.py --autoencoder runs/ae_qm9/autoencoder.eqx --out-dir runs/ldm_qm9 \
        --resume runs/ldm_qm9/last.eqx
    python recipes/sample.py --checkpoint runs/ldm_qm9/last.eqx --sampler.sampler ddim --sampler.steps 100
    python recipes/progressive_distill.py --teacher runs/ldm_qm9/last.eqx --out-dir runs/pd_latent
    python recipes/train_latent.py --dry-run

Writes config.json, metrics.jsonl, last.eqx and best.eqx (lowest validation loss) into --out-dir; the
checkpoints are "latent_train_state" files that embed the autoencoder, so sampling (recipes/sample.py, which
decodes the latents) and distillation need nothing else.
"""

from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import tyro

from sde_mol import checkpoint, cli
from sde_mol.data.loader import encode_split
from sde_mol.data.qm9 import QM9_BUCKETS, load_qm9
from sde_mol.latent import (
    AutoencoderConfig,
    LatentObjective,
    build_latent_denoiser,
    build_latent_sampler,
    latent_state_skeleton,
    load_autoencoder,
)
from sde_mol.molecule import Molecule
from sde_mol.objectives.denoising import ContinuousDenoisingLoss
from sde_mol.run import recipe as rr
from sde_mol.run.build import dataset_info, optimizer_from
from sde_mol.run.configs import DataConfig, ModelConfig, ModelSpec, OptimConfig, SamplerConfig, from_dict, to_dict
from sde_mol.training.loop import LoopConfig
from sde_mol.training.state import count_params, init_state


@dataclass(frozen=True)
class Config:
    autoencoder: Path = Path("runs/autoencoder/autoencoder.eqx")
    """a trained autoencoder (recipes/train_autoencoder.py: autoencoder.eqx, or its last.eqx / best.eqx)"""
    spec: ModelSpec = field(default_factory=lambda: ModelSpec(ModelConfig(hidden=64, n_layers=4)))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, ema_decay=0.999))
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=64, buckets=QM9_BUCKETS))
    train: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=100_000, eval_every=5000, ckpt_every=1000, log_every=100)
    )
    n_valid: int = 500
    """validation molecules for the validation loss (EMA model, fixed noise)"""
    eval_samples: int = 100
    """molecules sampled, decoded and scored at each evaluation (0 to skip)"""
    eval_sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig("ddim", steps=100))
    out_dir: Path = Path("runs/latent")
    resume: Path | None = None
    """a last.eqx/best.eqx of this recipe to continue from (its spec must match)"""
    init_seed: int = 0
    dry_run: bool = False


def make_evaluate(cfg: Config, objective: LatentObjective, autoencoder, info):
    pos, feat, mask = encode_split(load_qm9("valid").subset(slice(0, cfg.n_valid)), info)
    mols, masks = Molecule(jnp.asarray(pos), jnp.asarray(feat)), jnp.asarray(mask)
    weights = jnp.ones(masks.shape[0])

    @eqx.filter_jit
    def val_loss(den):
        return objective.batch_loss(den, mols, masks, weights, key=jr.PRNGKey(cfg.train.seed + 1), step=0)[0]

    def evaluate(state) -> dict:
        out = {"val_loss": float(val_loss(state.ema_model))} if cfg.n_valid else {}
        if cfg.eval_samples:
            fn = build_latent_sampler(cfg.eval_sampler, state.ema_model, autoencoder)
            scores = rr.score_samples(fn, info, cfg.eval_samples, seed=cfg.train.seed + 2)
            out.update({k: v for k, v in scores.items() if k != "n_molecules"})
        return out

    return evaluate


def main(cfg: Config) -> None:
    if cfg.resume is not None:
        stored = from_dict(ModelSpec, checkpoint.read_header(cfg.resume)["config"]["spec"])
        if stored != cfg.spec:
            raise ValueError(f"{cfg.resume}: its model spec {stored} differs from the requested {cfg.spec}")
    if not cfg.dry_run and not Path(cfg.autoencoder).is_file():
        raise FileNotFoundError(
            f"autoencoder {cfg.autoencoder} does not exist (train one: recipes/train_autoencoder.py)"
        )
    full = rr.start(cfg)
    if full is None:
        return
    autoencoder, ae_header = load_autoencoder(Path(cfg.autoencoder))
    info = dataset_info(cfg.spec.dataset)
    if info != autoencoder.info:
        raise ValueError(f"{cfg.autoencoder}: the autoencoder's dataset differs from the spec's {cfg.spec.dataset!r}")
    hcfg = {
        "recipe": "train_latent", "latent": True, "spec": to_dict(cfg.spec),
        "autoencoder": ae_header["config"]["autoencoder"], "autoencoder_source": str(cfg.autoencoder),
        "optim": to_dict(cfg.optim), "with_target": False, "full": full,
    }  # fmt: skip
    optimizer = optimizer_from(cfg.optim)
    if cfg.resume is not None:
        like = latent_state_skeleton(cfg.spec, from_dict(AutoencoderConfig, hcfg["autoencoder"]), hcfg)
        state, _ = checkpoint.load(cfg.resume, like)
        print(f"resumed from {cfg.resume} at step {int(state.step)}")
    else:
        den = build_latent_denoiser(cfg.spec, autoencoder.latent_channels, key=jr.PRNGKey(cfg.init_seed))
        state = init_state(den, optimizer)
    print(f"trainable parameters: {count_params(state.model):,}; latent channels {autoencoder.latent_channels}")
    objective = LatentObjective(ContinuousDenoisingLoss("eps"), autoencoder)
    rr.fit(
        state, objective, optimizer, rr.qm9_batches(cfg.data, seed=cfg.train.seed), loop=cfg.train,
        ema_decay=cfg.optim.ema_decay, out_dir=cfg.out_dir, header=hcfg, batch_size=cfg.data.batch_size,
        kind="latent_train_state", saved=lambda st: (st, autoencoder),
        evaluate=make_evaluate(cfg, objective, autoencoder, info) if cfg.n_valid or cfg.eval_samples else None,
        best_key="val_loss" if cfg.n_valid else None,
    )  # fmt: skip


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
