"""The recipe skeleton every training recipe shares: start a run (resolved config, --dry-run, config.json),
resolve a `--teacher` (an exact oracle of a few QM9 molecules, or a checkpoint), the QM9 batch source, resume
or start a training state, the jitted step and the loop, and scoring sampled molecules."""

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from .. import checkpoint, metrics
from ..cli import UsageError
from ..data.fixed import fixed_molecules
from ..data.loader import BatchIterator, encode_split
from ..data.qm9 import DatasetInfo, load_qm9
from ..denoisers import AbstractDenoiser
from ..latent import LatentSampler, is_latent, load_latent
from ..likelihood import dataset_nll
from ..molecule import Molecule, com_free_normal
from ..objectives.base import AbstractObjective
from ..objectives.denoising import eps_error
from ..samplers import SamplerFn, buckets_for, sample_molecules
from ..training.loop import LoopConfig, run_loop
from ..training.prefetch import host_batches, to_device
from ..training.state import TrainState, compute_dtype_from, init_state, make_step
from ..typing import HasNet
from .build import build_denoiser, build_sampler, continuous_teacher, dataset_info
from .configs import DataConfig, EvalConfig, ModelSpec, SamplerConfig, from_dict, to_dict
from .load import load_denoiser, train_state_skeleton


def start(cfg: Any) -> dict | None:
    """Print the resolved config; None on `cfg.dry_run`; else create `cfg.out_dir`, write config.json there and
    return the config as JSON data (what checkpoint headers store as "full")."""
    full = json.loads(json.dumps(to_dict(cfg), default=str))
    print(json.dumps(full, indent=2))
    if cfg.dry_run:
        return None
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "config.json").write_text(json.dumps(full, indent=2))
    return full


def parse_count(value: str, prefix: str, flag: str) -> int | None:
    """n of a `<prefix>:<n>` flag value (e.g. oracle:16), None when the value is not of that form."""
    if not value.startswith(prefix + ":"):
        return None
    n = value.removeprefix(prefix + ":")
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"{flag} {value!r}: expected {prefix}:<n> with a positive integer n")
    return int(n)


def qm9_batches(data: DataConfig, *, seed: int) -> Callable:
    """Host batches of the QM9 train split (its first `data.n_train` molecules when set), from a global step on."""
    train = load_qm9("train")
    if data.n_train is not None:
        train = train.subset(slice(0, data.n_train))
    iterator = BatchIterator(train, dataset_info(data.dataset), data.batch_size, seed=seed, buckets=data.buckets)
    return lambda start: host_batches(iterator, start)


def oracle_teacher(
    n: int, spec: ModelSpec, *, atoms: int, rotations: int, init_seed: int, data: DataConfig, data_seed: int
) -> tuple[AbstractDenoiser, AbstractDenoiser, Callable]:
    """`--teacher oracle:<n>`: (the exact denoiser of the first n QM9 train molecules of `atoms` atoms under
    `rotations` fixed rotations, a fresh student of `spec` on whose SDE the oracle lives, their host batches)."""
    student = build_denoiser(spec, key=jr.PRNGKey(init_seed))
    try:
        oracle, batches = fixed_molecules(
            n, atoms, student.sde, rotations=rotations, seed=init_seed, batch_size=data.batch_size, data_seed=data_seed
        )
    except ValueError as e:
        raise ValueError(f"--teacher oracle:{n}: {e}") from None
    return oracle, student, batches


def checkpoint_teacher(path: Path, *, continuous_time: bool, latent_ok: bool) -> tuple:
    """`--teacher <checkpoint>`: (teacher denoiser, its spec, its autoencoder or None, header additions). A
    latent model brings its autoencoder (refused unless `latent_ok`); `continuous_time` moves the teacher to
    the continuous twin of its SDE."""
    if not path.is_file():
        raise FileNotFoundError(f"--teacher {path} does not exist (a checkpoint path, or oracle:<n>)")
    extra, autoencoder = {}, None
    if is_latent(checkpoint.read_header(path)):
        if not latent_ok:
            raise ValueError(f"--teacher {path}: latent teachers are not supported by this recipe")
        teacher, autoencoder, spec, header = load_latent(path)
        extra = {"latent": True, "autoencoder": header["config"]["autoencoder"]}
    else:
        teacher, spec, _ = load_denoiser(path)
    if continuous_time:
        teacher, spec = continuous_teacher(teacher, spec)
    return teacher, spec, autoencoder, extra


def check_same_run(resume: Path, full: dict, keys: tuple[str, ...], recorded_later: dict | None = None) -> None:
    """Refuse to resume `resume` unless its recorded config agrees with `full` on every field of `keys`
    (`recorded_later`: the values of fields a file written before they existed had)."""
    stored = dict(recorded_later or {}) | checkpoint.read_header(resume)["config"].get("full", {})
    for key in keys:
        if stored.get(key) != full[key]:
            raise ValueError(f"{resume}: its {key} {stored.get(key)!r} differs from the requested {full[key]!r}")


def initial_state(
    model: HasNet,
    optimizer: optax.GradientTransformation,
    *,
    with_target: bool,
    resume: Path | None,
    full: dict,
    keys: tuple[str, ...],
    kind: str = "train_state",
) -> TrainState:
    """A fresh training state of `model`, or the one of `resume`, whose recorded config must agree with `full`
    on every field of `keys` (a resumed run continues the same run)."""
    if resume is None:
        return init_state(model, optimizer, with_target=with_target)
    check_same_run(resume, full, keys)
    like = eqx.filter_eval_shape(lambda: init_state(model, optimizer, with_target=with_target))
    state = checkpoint.load(resume, like, kind=kind)
    print(f"resumed from {resume} at step {int(state.step)}")
    return state


def diffusion_state(
    spec: ModelSpec,
    optimizer: optax.GradientTransformation,
    header: dict,
    *,
    resume: Path | None,
    init_from: Path | None,
    init_seed: int,
) -> TrainState:
    """The training state of a diffusion model of `spec`: `resume` (a train_state of the same spec, continued),
    `init_from` (a warm start from any checkpoint holding a denoiser of the same network and parametrisation:
    model and EMA start from its EMA weights, the optimiser state is fresh, the step continues from its header;
    the SDE may differ, e.g. T = 200 -> 1000, and is then replaced) or a new model from `init_seed`."""
    if resume is not None and init_from is not None:
        raise UsageError("--resume and --init-from exclude each other (resume continues a run; init-from starts one)")
    if resume is not None:
        stored_header = checkpoint.read_header(resume)
        if stored_header["kind"] != "train_state":
            raise UsageError(
                f"--resume {resume}: expected a train_state checkpoint (runs/<name>/last.eqx), got a "
                f"{stored_header['kind']} (to start from a model's weights, use --init-from)"
            )
        stored = from_dict(ModelSpec, stored_header["config"]["spec"])
        if stored != spec:
            raise UsageError(f"{resume}: its model spec {stored} differs from the requested {spec}")
        if stored_header["config"].get("loss") != header.get("loss"):
            raise UsageError(
                f"{resume}: trained with loss settings {stored_header['config'].get('loss') or 'EDM default'}, "
                f"the requested --loss.* are {header.get('loss') or 'EDM default'} (a run keeps its loss)"
            )
        state = checkpoint.load(resume, train_state_skeleton(spec, header))
        print(f"resumed from {resume} at step {int(state.step)}")
        return state
    if init_from is None:
        return init_state(build_denoiser(spec, key=jr.PRNGKey(init_seed)), optimizer)
    stored = from_dict(ModelSpec, checkpoint.read_header(init_from)["config"]["spec"])
    if replace(stored, sde=spec.sde) != spec:
        raise UsageError(
            f"{init_from}: its network or parametrisation {stored} differs from the requested {spec} "
            "(--init-from carries the network over; only the SDE may change)"
        )
    den, stored, stored_header = load_denoiser(init_from)
    if stored.sde != spec.sde:  # the network carries over; the denoiser gets the requested SDE
        den = eqx.tree_at(lambda d: d.net, build_denoiser(spec, key=jr.PRNGKey(init_seed)), den.net)
        print(f"--init-from: SDE changed from {to_dict(stored.sde)} to {to_dict(spec.sde)}; network kept")
    state = init_state(den, optimizer)
    state = eqx.tree_at(lambda s: s.step, state, jnp.array(int(stored_header.get("step", 0)), jnp.int32))
    print(f"initialised from {init_from} (step {int(state.step)}; fresh optimiser state)")
    return state


def fit(
    state: TrainState,
    objective: AbstractObjective,
    optimizer: optax.GradientTransformation,
    batches: Callable,
    *,
    loop: LoopConfig,
    ema_decay: float,
    out_dir: Path,
    header: dict,
    batch_size: int,
    kind: str = "train_state",
    target_decay: Callable | None = None,
    saved: Callable[[TrainState], Any] = lambda state: state,
    **run_kw,
) -> TrainState:
    """The jitted step (donated buffers, `loop.precision`) run by `run_loop`; checkpoints of `kind` hold
    `saved(state)` (e.g. the state with the autoencoder it needs) and carry `header` as their config.
    `run_kw`: run_loop's evaluate, best_key."""
    step_fn = make_step(
        objective,
        optimizer,
        ema_decay=ema_decay,
        target_decay=target_decay,
        donate=True,  # run_loop never reuses a consumed state
        compute_dtype=compute_dtype_from(loop.precision),
    )

    def save(path, st):
        checkpoint.save(path, saved(st), kind=kind, config=header, step=int(st.step))

    return run_loop(
        state, step_fn, batches, cfg=loop, out_dir=out_dir, save=save, batch_size=batch_size, to_device=to_device,
        **run_kw,
    )  # fmt: skip


def score_samples(fn: SamplerFn, info: DatasetInfo, n: int, *, seed: int, reference: Any = None) -> dict:
    """EDM's metrics of n molecules drawn by `fn` (molecule i from `fold_in(PRNGKey(seed), i)`), sampled in
    batches of at most 100 at QM9's size buckets (`samplers.batching.buckets_for`), as recipes/sample.py does."""
    res = sample_molecules(fn, n, info, key=jr.PRNGKey(seed), batch_size=min(n, 100), buckets=buckets_for(info))
    m = metrics.evaluate_samples(res, reference, atom_decoder=info.atom_decoder)
    return {k: v for k, v in m.items() if v is not None}


def score_sampler(
    cfg: SamplerConfig, den: AbstractDenoiser, spec: ModelSpec, n: int, *, seed: int, autoencoder=None
) -> dict:
    """`score_samples` of the sampler `cfg` on `den` (a latent denoiser decoded by its `autoencoder`)."""
    info = dataset_info(spec.dataset)
    if autoencoder is None:
        return score_samples(build_sampler(cfg, den, info.n_feat), info, n, seed=seed)
    fn = LatentSampler(build_sampler(cfg, den, autoencoder.latent_channels), autoencoder)
    return score_samples(fn, info, n, seed=seed)


def nll_steps(denoiser: AbstractDenoiser) -> int:
    """The T of EDM's bound for a model: its own discrete table's, or EDM's 1000 for a continuous SDE."""
    return denoiser.sde.time_resolution or 1000


def split_nll(path: Path, split: str, *, limit: int | None, seed: int, batch_size: int) -> dict:
    """A checkpoint's mean NLL (EDM's one-draw variational bound, nats per molecule) on the first `limit`
    molecules of a QM9 split (all: None), with its standard error over molecules."""
    denoiser, spec, header = load_denoiser(path)
    info = dataset_info(spec.dataset)
    data = load_qm9(split)
    n = len(data) if limit is None else min(limit, len(data))
    pos, feat, mask = encode_split(data.subset(slice(0, n)), info)
    t0 = time.perf_counter()
    try:
        nll = dataset_nll(
            denoiser, pos, feat, mask, info, key=jr.PRNGKey(seed), batch_size=batch_size, timesteps=nll_steps(denoiser)
        )
    except FloatingPointError as e:
        raise FloatingPointError(f"{path}: {e}") from None
    return {
        "nll": float(nll.mean()),
        "nll_sem": float(nll.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
        "nll_split": f"{spec.dataset}/{split}",
        "nll_molecules": int(n),
        "nll_seconds": time.perf_counter() - t0,
        "checkpoint": str(path),
        "checkpoint_step": header.get("step"),
    }


def diffusion_evaluator(cfg: EvalConfig, info: DatasetInfo, *, seed: int) -> Callable[[TrainState], dict] | None:
    """`evaluate(state)` of a diffusion training run, on its EMA model: the VLB (EDM's one-draw estimator) of
    `cfg.n_valid` validation molecules, the eps MSE at each of `cfg.levels` (fixed noise: paired across
    evaluations) and their mean val_eps_mse, and EDM's metrics of `cfg.n_samples` molecules of `cfg.sampler`.
    None when there is nothing to evaluate."""
    if not (cfg.n_valid or cfg.n_samples):
        return None
    pos, feat, mask = encode_split(load_qm9("valid").subset(slice(0, cfg.n_valid)), info)
    chunks = [
        (Molecule(jnp.asarray(pos[i : i + 100]), jnp.asarray(feat[i : i + 100])), jnp.asarray(mask[i : i + 100]), i)
        for i in range(0, cfg.n_valid, 100)
    ]
    ref_smiles = []

    @eqx.filter_jit
    def eps_batch(den, mols, masks, t, key):
        noise = jax.vmap(lambda k, m: com_free_normal(k, m, info.n_feat))(jr.split(key, masks.shape[0]), masks)
        err, n = jax.vmap(lambda x, m, e: eps_error(den, x, m, t, e))(mols, masks, noise)
        return jnp.sum(err), jnp.sum(n)

    def evaluate(state: TrainState) -> dict:
        t0, den, out = time.perf_counter(), state.ema_model, {}
        if cfg.n_valid:
            nll = dataset_nll(
                den, pos, feat, mask, info, key=jr.PRNGKey(seed + 1), batch_size=100, timesteps=nll_steps(den)
            )
            # one draw of t and noise per molecule (EDM's estimator) is heavy-tailed: its standard error goes
            # beside it (experiments/NOTES.md, "Fine-tuning the imported EDM model")
            out["val_nll"] = float(np.mean(nll))
            if len(nll) > 1:
                out["val_nll_sem"] = float(np.std(nll, ddof=1) / np.sqrt(len(nll)))
            for t in cfg.levels:
                sums = [eps_batch(den, x, m, jnp.float32(t), jr.fold_in(jr.PRNGKey(seed + 3), i)) for x, m, i in chunks]
                out[f"val_eps_mse@{t:g}"] = float(sum(e for e, _ in sums) / sum(n for _, n in sums))
            if cfg.levels:
                out["val_eps_mse"] = float(np.mean([out[f"val_eps_mse@{t:g}"] for t in cfg.levels]))
        if cfg.n_samples:
            fn = build_sampler(cfg.sampler, den, info.n_feat)
            res = sample_molecules(fn, cfg.n_samples, info, key=jr.PRNGKey(seed + 2), batch_size=cfg.batch_size)
            if not ref_smiles:  # built once per run
                ref_smiles.append(metrics.train_smiles())
            m = metrics.evaluate_samples(res, ref_smiles[0])
            out.update({k: v for k, v in m.items() if k != "n_molecules" and v is not None})
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    return evaluate
