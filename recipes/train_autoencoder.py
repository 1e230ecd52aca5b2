"""Train GeoLDM's equivariant autoencoder on QM9: the first stage of latent diffusion (Xu et al. 2023).

Usage:
    python recipes/train_autoencoder.py --out-dir runs/ae_qm9
    python recipes/train_autoencoder.py --out-dir runs/ae_small --train.steps 600 --data.n-train 5000 \
        --ae.hidden 32 --ae.decoder-layers 2 --ae.latent-channels 2
    python recipes/train_autoencoder.py --out-dir runs/ae_qm9 --resume runs/ae_qm9/last.eqx
    python recipes/train_autoencoder.py --dry-run

Writes config.json, metrics.jsonl, last.eqx (kind autoencoder_train_state, for --resume), best.eqx (lowest
validation reconstruction loss) and, at the end, autoencoder.eqx (kind autoencoder: the EMA weights, what
recipes/train_latent.py reads) into --out-dir. Evaluations reconstruct --n-valid validation molecules from
their encoder means and report the atom-type accuracy and the position RMSD (Angstrom).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import tyro

from sde_mol import checkpoint, cli
from sde_mol.data.loader import BatchIterator, encode_split
from sde_mol.data.qm9 import QM9_BUCKETS, load_qm9
from sde_mol.latent import AutoencoderConfig, autoencoder_state_skeleton, build_autoencoder
from sde_mol.molecule import Molecule
from sde_mol.nn.autoencoder import AutoencoderLoss, reconstruction_terms
from sde_mol.run.build import dataset_info, optimizer_from
from sde_mol.run.configs import DataConfig, OptimConfig, from_dict, to_dict
from sde_mol.training.loop import LoopConfig, run_loop
from sde_mol.training.prefetch import host_batches, to_device
from sde_mol.training.state import count_params, init_state, make_step


@dataclass(frozen=True)
class Config:
    ae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    kl_weight: float = 0.01
    """weight of the per-dimension KL(q(z | x, h) || N(0, I)) against the per-dimension reconstruction loss"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, ema_decay=0.99))
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32, buckets=QM9_BUCKETS))
    train: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=5000, eval_every=500, ckpt_every=500, log_every=50)
    )
    n_valid: int = 500
    """validation molecules reconstructed at each evaluation (EMA model)"""
    out_dir: Path = Path("runs/autoencoder")
    resume: Path | None = None
    """a last.eqx of this recipe to continue from (its autoencoder config must match)"""
    init_seed: int = 0
    dry_run: bool = False


def header_config(cfg: Config) -> dict:
    return {
        "recipe": "train_autoencoder",
        "autoencoder": to_dict(cfg.ae),
        "optim": to_dict(cfg.optim),
        "kl_weight": cfg.kl_weight,
        "full": json.loads(json.dumps(to_dict(cfg), default=str)),
    }


def make_evaluate(cfg: Config, info):
    pos, feat, mask = encode_split(load_qm9("valid").subset(slice(0, cfg.n_valid)), info)
    mols, masks = Molecule(jnp.asarray(pos), jnp.asarray(feat)), jnp.asarray(mask)
    n_types = info.n_types

    @eqx.filter_jit
    def terms(model, mols, masks):
        return jax.vmap(lambda m, k: reconstruction_terms(model, m, model.encode(m, k), k))(mols, masks)

    def evaluate(state) -> dict:
        out = terms(state.ema_model, mols, masks)
        n = jnp.sum(masks, axis=1).astype(jnp.float32)
        recon = (out["sq_x"] + out["ce"]) / ((n - 1.0) * 3.0 + n * n_types)
        return {
            "val_recon": float(jnp.mean(recon)),
            "type_accuracy": float(jnp.mean(out["type_accuracy"])),
            "rmsd": float(jnp.mean(out["rmsd"])),
        }

    return evaluate


def main(cfg: Config) -> dict:
    hcfg = header_config(cfg)
    if cfg.resume is not None:
        stored = from_dict(AutoencoderConfig, checkpoint.read_header(cfg.resume)["config"]["autoencoder"])
        if stored != cfg.ae:
            raise ValueError(f"{cfg.resume}: its autoencoder config {stored} differs from the requested {cfg.ae}")
    print(json.dumps(to_dict(cfg), indent=2, default=str))
    if cfg.dry_run:
        return {}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    info = dataset_info(cfg.ae.dataset)
    train = load_qm9("train")
    if cfg.data.n_train is not None:
        train = train.subset(slice(0, cfg.data.n_train))
    iterator = BatchIterator(train, info, cfg.data.batch_size, seed=cfg.train.seed, buckets=cfg.data.buckets)
    optimizer = optimizer_from(cfg.optim)
    if cfg.resume is not None:
        (state,) = checkpoint.load(cfg.resume, autoencoder_state_skeleton(cfg.ae, cfg.optim))
        print(f"resumed from {cfg.resume} at step {int(state.step)}")
    else:
        state = init_state(build_autoencoder(cfg.ae, key=jr.PRNGKey(cfg.init_seed)), optimizer)
    print(f"trainable parameters: {count_params(state.model):,}; train molecules {len(train):,}")
    step_fn = make_step(AutoencoderLoss(cfg.kl_weight), optimizer, ema_decay=cfg.optim.ema_decay, donate=True)

    def save(path, st):
        checkpoint.save(path, (st,), kind="autoencoder_train_state", config=hcfg, step=int(st.step))

    evaluate = make_evaluate(cfg, info) if cfg.n_valid else None
    state = run_loop(
        state,
        step_fn,
        lambda start: host_batches(iterator, start),
        cfg=cfg.train,
        out_dir=cfg.out_dir,
        save=save,
        evaluate=evaluate,
        best_key="val_recon",
        batch_size=cfg.data.batch_size,
        to_device=to_device,
    )
    final = cfg.out_dir / "autoencoder.eqx"
    checkpoint.save(final, state.ema_model, kind="autoencoder", config=hcfg, step=int(state.step))
    result = evaluate(state) if evaluate is not None else {}
    print(f"wrote {final}" + "".join(f"; {k} {v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
