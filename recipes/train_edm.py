"""Train an E(3)-equivariant diffusion model (EDM) on QM9.

Usage:
    python recipes/train_edm.py qm9-small --out-dir runs/edm_small
    python recipes/train_edm.py qm9-small --out-dir runs/edm_small --train.max-minutes 60
    python recipes/train_edm.py qm9-small --out-dir runs/edm_small --resume runs/edm_small/last.eqx
    python recipes/train_edm.py qm9-paper --out-dir runs/edm_paper          # EDM's released configuration
    python recipes/train_edm.py qm9-small --dry-run                          # print the resolved config

Writes config.json, metrics.jsonl (one JSON object per line), last.eqx (every --train.ckpt-every steps and at the
end) and best.eqx (best validation NLL) into --out-dir. Checkpoints are train_state files: sampling recipes
read their EMA model.
"""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

from sde_mol import checkpoint, cli, metrics
from sde_mol.cli import UsageError
from sde_mol.compile_cache import enable_compile_cache
from sde_mol.data.loader import BatchIterator, encode_split
from sde_mol.data.qm9 import load_qm9
from sde_mol.likelihood import vlb_nll
from sde_mol.molecule import Molecule, com_free_normal
from sde_mol.objectives.denoising import EDMEpsLoss, eps_error
from sde_mol.run.build import build_denoiser, build_sampler, dataset_info, optimizer_from
from sde_mol.run.configs import (
    DataConfig,
    DenoiserConfig,
    ModelConfig,
    ModelSpec,
    OptimConfig,
    SamplerConfig,
    SDEConfig,
    from_dict,
    to_dict,
)
from sde_mol.run.load import load_denoiser, train_state_skeleton
from sde_mol.samplers import sample_molecules
from sde_mol.training import distributed
from sde_mol.training.loop import LoopConfig, run_loop
from sde_mol.training.prefetch import host_batches, to_device
from sde_mol.training.state import compute_dtype_from, count_params, init_state, make_step


@dataclass(frozen=True)
class EvalConfig:
    n_valid: int = 1000
    """validation molecules for the NLL (EMA model, one pass of EDM's estimator) and the eps error per level"""
    levels: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6, 0.9)
    """times t at which the EMA model's eps MSE on the validation molecules is reported (val_eps_mse@t, fixed
    noise every evaluation: paired across steps), and their mean val_eps_mse (the run's best.eqx criterion)"""
    n_samples: int = 200
    """molecules sampled for stability/validity at each evaluation (0 to skip)"""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(sampler="ddim", steps=100))
    batch_size: int = 100


@dataclass(frozen=True)
class Config:
    spec: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
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
        Config(
            spec=ModelSpec(ModelConfig(hidden=128, n_layers=5), SDEConfig(timesteps=1000), DenoiserConfig()),
            optim=OptimConfig(lr=2e-5, ema_decay=0.999, warmup_steps=300, decay_steps=15_000, lr_end=2e-6),
            data=DataConfig(batch_size=64, buckets=(17, 20, 23, 29)),
            train=LoopConfig(steps=15_300, eval_every=5000, ckpt_every=500, log_every=100, eval_at_start=True),
            eval=EvalConfig(
                n_valid=1000, n_samples=500, sampler=SamplerConfig(sampler="reverse_sde", steps=250), batch_size=250
            ),
            out_dir=Path("runs/edm_qm9_finetune"),
        ),
    ),
    "qm9-small": (
        "fastest-learning configuration on a 2-core CPU: 4 layers, 64 hidden, lr 5e-4, EMA 0.999",
        Config(
            spec=ModelSpec(ModelConfig(hidden=64, n_layers=4), SDEConfig(), DenoiserConfig()),
            optim=OptimConfig(lr=5e-4, ema_decay=0.999),
            data=DataConfig(batch_size=64, buckets=(17, 20, 23, 29)),
            train=LoopConfig(steps=200_000, eval_every=5000, ckpt_every=1000, log_every=100),
            eval=EvalConfig(n_valid=500, n_samples=200),
            out_dir=Path("runs/edm_qm9_small"),
        ),
    ),
}


def header_config(cfg: Config) -> dict:
    return {
        "recipe": "train_edm",
        "spec": to_dict(cfg.spec),
        "optim": to_dict(cfg.optim),
        "with_target": False,
        "full": json.loads(json.dumps(to_dict(cfg), default=str)),
    }


def make_evaluate(cfg: Config, info):
    valid = load_qm9("valid").subset(slice(0, cfg.eval.n_valid))
    pos, feat, mask = encode_split(valid, info)
    mols, masks = Molecule(jnp.asarray(pos), jnp.asarray(feat)), jnp.asarray(mask)
    ref_smiles = None

    @eqx.filter_jit
    def nll_batch(den, mols, masks, key):
        keys = jr.split(key, masks.shape[0])
        return jax.vmap(lambda m, k, kk: vlb_nll(den, m, k, info, key=kk))(mols, masks, keys)

    @eqx.filter_jit
    def eps_batch(den, mols, masks, t, key):
        noise = jax.vmap(lambda k, m: com_free_normal(k, m, info.n_feat))(jr.split(key, masks.shape[0]), masks)
        err, n = jax.vmap(lambda x, m, e: eps_error(den, x, m, t, e))(mols, masks, noise)
        return jnp.sum(err), jnp.sum(n)

    def evaluate(state) -> dict:
        nonlocal ref_smiles
        t0 = time.perf_counter()
        den = state.ema_model
        key = jr.PRNGKey(cfg.train.seed + 1)
        nlls = []
        for i in range(0, masks.shape[0], 100):
            chunk = Molecule(mols.positions[i : i + 100], mols.features[i : i + 100])
            nlls.append(nll_batch(den, chunk, masks[i : i + 100], jr.fold_in(key, i)))
        out = {"val_nll": float(jnp.mean(jnp.concatenate(nlls)))}
        for t in cfg.eval.levels:
            sums = [
                eps_batch(
                    den,
                    Molecule(mols.positions[i : i + 100], mols.features[i : i + 100]),
                    masks[i : i + 100],
                    jnp.float32(t),
                    jr.fold_in(jr.PRNGKey(cfg.train.seed + 3), i),
                )
                for i in range(0, masks.shape[0], 100)
            ]
            out[f"val_eps_mse@{t:g}"] = float(sum(e for e, _ in sums) / sum(n for _, n in sums))
        if cfg.eval.levels:
            out["val_eps_mse"] = float(np.mean([out[f"val_eps_mse@{t:g}"] for t in cfg.eval.levels]))
        if cfg.eval.n_samples:
            sampler = build_sampler(cfg.eval.sampler, den, info.n_feat)
            res = sample_molecules(
                sampler, cfg.eval.n_samples, info, key=jr.PRNGKey(cfg.train.seed + 2), batch_size=cfg.eval.batch_size
            )
            if ref_smiles is None:
                ref_smiles = metrics.train_smiles()
            m = metrics.evaluate_samples(res, ref_smiles)
            out.update({k: v for k, v in m.items() if k != "n_molecules" and v is not None})
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    return evaluate


def main(cfg: Config) -> None:
    distributed.initialise()  # multi-host runs only (see sde_mol/training/distributed.py); a no-op otherwise
    if cfg.resume is not None and cfg.init_from is not None:
        raise UsageError("--resume and --init-from exclude each other (resume continues a run; init-from starts one)")
    if cfg.resume is not None:
        header = checkpoint.read_header(cfg.resume)
        if header["kind"] != "train_state":
            raise UsageError(
                f"--resume {cfg.resume}: expected a train_state checkpoint (runs/<name>/last.eqx), got a "
                f"{header['kind']} (to start from a model's weights, use --init-from)"
            )
        stored = from_dict(ModelSpec, header["config"]["spec"])
        if stored != cfg.spec:
            raise UsageError(f"{cfg.resume}: its model spec {stored} differs from the requested {cfg.spec}")
    if cfg.init_from is not None:
        stored = from_dict(ModelSpec, checkpoint.read_header(cfg.init_from)["config"]["spec"])
        if dataclasses.replace(stored, sde=cfg.spec.sde) != cfg.spec:
            raise UsageError(
                f"{cfg.init_from}: its network or parametrisation {stored} differs from the requested {cfg.spec} "
                "(--init-from carries the network over; only the SDE may change)"
            )
    print(json.dumps(to_dict(cfg), indent=2, default=str))
    if cfg.dry_run:
        return
    enable_compile_cache(cfg.compile_cache)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    info = dataset_info(cfg.data.dataset)
    train = load_qm9("train")
    if cfg.data.n_train is not None:
        train = train.subset(slice(0, cfg.data.n_train))
    iterator = BatchIterator(
        train, info, cfg.data.batch_size, seed=cfg.train.seed, shuffle=True, drop_last=True, buckets=cfg.data.buckets
    )
    optimizer = optimizer_from(cfg.optim)
    hcfg = header_config(cfg)
    if cfg.resume is not None:
        state = checkpoint.load(cfg.resume, train_state_skeleton(cfg.spec, hcfg))
        print(f"resumed from {cfg.resume} at step {int(state.step)}")
    elif cfg.init_from is not None:
        den, stored, header = load_denoiser(cfg.init_from)
        if stored.sde != cfg.spec.sde:  # the network carries over; the denoiser gets the requested SDE
            den = eqx.tree_at(lambda d: d.net, build_denoiser(cfg.spec, key=jr.PRNGKey(cfg.init_seed)), den.net)
            print(f"--init-from: SDE changed from {to_dict(stored.sde)} to {to_dict(cfg.spec.sde)}; network kept")
        state = init_state(den, optimizer)
        state = eqx.tree_at(lambda s: s.step, state, jnp.array(int(header.get("step", 0)), jnp.int32))
        print(f"initialised from {cfg.init_from} (step {int(state.step)}; fresh optimiser state)")
    else:
        state = init_state(build_denoiser(cfg.spec, key=jr.PRNGKey(cfg.init_seed)), optimizer)
    print(f"trainable parameters: {count_params(state.model):,}; train molecules {len(train):,}")
    objective = EDMEpsLoss(info, timesteps=cfg.spec.sde.timesteps)
    step_fn = make_step(
        objective,
        optimizer,
        ema_decay=cfg.optim.ema_decay,
        donate=True,  # run_loop never reuses a consumed state
        compute_dtype=compute_dtype_from(cfg.train.precision),
    )

    def save(path, st):
        checkpoint.save(path, st, kind="train_state", config=hcfg, step=int(st.step))

    run_loop(
        state,
        step_fn,
        lambda start: host_batches(iterator, start),
        cfg=cfg.train if cfg.resume is None else dataclasses.replace(cfg.train, eval_at_start=False),
        out_dir=cfg.out_dir,
        save=save,
        evaluate=make_evaluate(cfg, info) if cfg.eval.n_valid or cfg.eval.n_samples else None,
        best_key="val_eps_mse" if cfg.eval.n_valid and cfg.eval.levels else "val_nll",
        batch_size=cfg.data.batch_size,
        to_device=to_device,
    )


if __name__ == "__main__":
    cli.run(main, lambda: tyro.extras.overridable_config_cli(PRESETS))
