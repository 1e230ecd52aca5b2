"""Training: TrainState, one jitted step (loss, grad, optax update, EMA, target update) and the one loop.

Trainable parameters are the inexact-array leaves of `model.net`; everything else in a model (the SDE and its
schedule table, preconditioning constants) is frozen by construction, so the optimiser never touches it.

Randomness: the key of step k is `fold_in(base_key, k)`, and the data order of epoch e is a seeded shuffle,
so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PyTree

from .molecule import Molecule
from .objectives.base import AbstractObjective
from .typing import Key


class TrainState(eqx.Module):
    model: PyTree
    ema_model: PyTree
    target_model: PyTree | None
    opt_state: PyTree
    step: Int[Array, ""]


def trainable_filter(model: PyTree) -> PyTree:
    """Filter spec: True on the inexact-array leaves of `model.net`, False elsewhere."""
    spec = jax.tree.map(lambda _: False, model)
    return eqx.tree_at(lambda m: m.net, spec, replace=jax.tree.map(eqx.is_inexact_array, model.net))


def params_of(model: PyTree) -> PyTree:
    return eqx.filter(model, trainable_filter(model))


class AdaptiveClipState(eqx.Module):
    queue: Float[Array, " n"]  # newest first; entries beyond `count` are unused
    count: Int[Array, ""]


def adaptive_clip(queue_size: int = 50, initial: float = 3000.0) -> optax.GradientTransformation:
    """EDM's adaptive gradient clipping: clip the global norm to 1.5 * mean + 2 * std (population) of the
    last `queue_size` recorded norms (seeded with `initial`), then record min(norm, max_norm)."""

    def init(params):
        del params
        q = jnp.zeros(queue_size, jnp.float32).at[0].set(initial)
        return AdaptiveClipState(q, jnp.array(1, jnp.int32))

    def update(updates, state, params=None):
        del params
        valid = jnp.arange(queue_size) < state.count
        n = jnp.sum(valid)
        mean = jnp.sum(jnp.where(valid, state.queue, 0.0)) / n
        var = jnp.sum(jnp.where(valid, (state.queue - mean) ** 2, 0.0)) / n
        max_norm = 1.5 * mean + 2.0 * jnp.sqrt(var)
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm > max_norm, max_norm / norm, 1.0)
        updates = jax.tree.map(lambda g: g * scale, updates)
        queue = jnp.roll(state.queue, 1).at[0].set(jnp.minimum(norm, max_norm))
        return updates, AdaptiveClipState(queue, jnp.minimum(state.count + 1, queue_size))

    return optax.GradientTransformation(init, update)


def build_optimizer(
    lr: float = 1e-4,
    *,
    weight_decay: float = 1e-12,
    amsgrad: bool = True,
    clip: str = "adaptive",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    warmup_steps: int = 0,
) -> optax.GradientTransformation:
    """EDM's optimiser: AdamW (amsgrad, weight decay 1e-12, constant lr) with adaptive clipping.
    `clip` is "adaptive", "none" or a number (fixed global-norm clipping)."""
    parts = []
    if clip == "adaptive":
        parts.append(adaptive_clip())
    elif clip != "none":
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(optax.scale_by_amsgrad(b1, b2, eps) if amsgrad else optax.scale_by_adam(b1, b2, eps))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else lr
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def init_state(model: PyTree, optimizer: optax.GradientTransformation, *, with_target: bool = False) -> TrainState:
    opt_state = optimizer.init(params_of(model))
    return TrainState(model, model, model if with_target else None, opt_state, jnp.array(0, jnp.int32))


def ema_update(ema: PyTree, new: PyTree, decay: Float[Array, ""] | float) -> PyTree:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta on trainable leaves; frozen leaves from `new`."""
    spec = trainable_filter(new)
    e_params, _ = eqx.partition(ema, spec)
    n_params, static = eqx.partition(new, spec)
    mixed = jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, e_params, n_params)
    return eqx.combine(mixed, static)


@dataclass(frozen=True)
class StepBatch:
    """What one training step consumes (device arrays)."""

    mols: Molecule
    masks: Bool[Array, "batch n_atoms"]
    weights: Float[Array, " batch"]


def make_step(
    objective: AbstractObjective,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float,
    target_decay: Callable[[Int[Array, ""]], Float[Array, ""]] | None = None,
) -> Callable:
    """One training step in ONE `eqx.filter_jit`: loss, grad, optax update, EMA and target update.
    Returns step(state, mols, masks, weights, key) -> (state, aux)."""

    @eqx.filter_jit
    def step(state: TrainState, mols: Molecule, masks, weights, key: Key):
        model = state.model
        spec = trainable_filter(model)
        params, static = eqx.partition(model, spec)
        skey = jr.fold_in(key, state.step)
        target = None if state.target_model is None else jax.lax.stop_gradient(state.target_model)

        def loss_fn(p):
            m = eqx.combine(p, static)
            return objective.batch_loss(m, mols, masks, weights, key=skey, step=state.step, target=target)

        (loss, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = eqx.apply_updates(params, updates)
        model = eqx.combine(params, static)
        ema_model = ema_update(state.ema_model, model, ema_decay)
        if target is not None:
            decay = target_decay(state.step) if target_decay is not None else 0.0
            target = ema_update(target, model, decay)
        aux = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
        return TrainState(model, ema_model, target, opt_state, state.step + 1), aux

    return step


# ------------------------------------------------------------------------------------------------ the loop


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 10_000
    """total optimiser steps (a resumed run counts from its checkpoint's step)"""
    max_minutes: float | None = None
    """wall-clock budget for this invocation; the run checkpoints and stops cleanly when it is spent"""
    log_every: int = 50
    eval_every: int = 2000
    ckpt_every: int = 1000
    seed: int = 0


def _progress_line(step, total, t_start, step_start, batch_size, aux, eta_budget):
    dt = time.perf_counter() - t_start
    done = step - step_start
    sps = done / dt if dt > 0 else 0.0
    remaining = (total - step) / sps if sps > 0 else float("inf")
    if eta_budget is not None:
        remaining = min(remaining, eta_budget)
    eta = "?" if not math.isfinite(remaining) else time.strftime("%H:%M:%S", time.gmtime(remaining))
    return (
        f"step {step}/{total}  loss {aux['loss']:.4f}  {sps:.2f} steps/s  {sps * batch_size:.1f} mol/s  ETA {eta}",
        sps,
    )


def run_loop(
    state: TrainState,
    step_fn: Callable,
    batches: Callable[[int], Iterator],
    *,
    cfg: LoopConfig,
    out_dir: Path,
    save: Callable[[Path, TrainState], None],
    evaluate: Callable[[TrainState], dict[str, float]] | None = None,
    best_key: str | None = None,
    batch_size: int,
    to_device: Callable[[Any], tuple],
) -> TrainState:
    """The one Python training loop: steps, progress line, metrics.jsonl, periodic evaluation, checkpoints
    (last.eqx always; best.eqx by `best_key`, lower is better), wall-clock budget, resume by `state.step`.

    `batches(start_step)` yields host batches from the given global step on (so resume is exact);
    `to_device(batch)` turns one into the step function's (mols, masks, weights) arguments."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "metrics.jsonl"
    key = jr.PRNGKey(cfg.seed)
    start = int(state.step)
    t_start = time.perf_counter()
    deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes else None
    best = _read_best(out_dir, best_key)
    it = batches(start)
    step = start
    with open(log_path, "a") as log:

        def record(obj):
            log.write(json.dumps(obj) + "\n")
            log.flush()

        while step < cfg.steps:
            batch = next(it)
            state, aux = step_fn(state, *to_device(batch), key)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                aux = {k: float(v) for k, v in aux.items()}
                if not math.isfinite(aux["loss"]):
                    save(out_dir / "nan_state.eqx", state)
                    raise FloatingPointError(f"loss is {aux['loss']} at step {step}; state saved to nan_state.eqx")
                eta_budget = None if deadline is None else deadline - time.perf_counter()
                line, sps = _progress_line(step, cfg.steps, t_start, start, batch_size, aux, eta_budget)
                print(line, flush=True)
                record({"step": step, "time": time.time(), "steps_per_s": sps, **aux})
            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics = evaluate(state)
                record({"step": step, "time": time.time(), "eval": metrics})
                print(f"eval @ {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
                if best_key is not None and metrics.get(best_key) is not None and metrics[best_key] < best:
                    best = metrics[best_key]
                    save(out_dir / "best.eqx", state)
                    (out_dir / "best.json").write_text(json.dumps({"step": step, best_key: best}))
            out_of_time = deadline is not None and time.perf_counter() > deadline
            if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
                save(out_dir / "last.eqx", state)
            if out_of_time:
                print(
                    f"wall-clock budget of {cfg.max_minutes} min spent at step {step}; resume with --resume "
                    f"{out_dir / 'last.eqx'}",
                    flush=True,
                )
                break
    return state


def _read_best(out_dir: Path, best_key: str | None) -> float:
    path = out_dir / "best.json"
    if best_key is None or not path.is_file():
        return float("inf")
    return float(json.loads(path.read_text()).get(best_key, float("inf")))


def host_batches(iterator, start_step: int) -> Iterator:
    """Batches of a seeded `BatchIterator` from global step `start_step` on (epoch = step // len)."""
    n = len(iterator)
    epoch, offset = divmod(start_step, n)
    while True:
        for i, batch in enumerate(iterator.epoch(epoch)):
            if i >= offset:
                yield batch
        epoch, offset = epoch + 1, 0


def to_device(batch) -> tuple:
    return (
        Molecule(jnp.asarray(batch.positions), jnp.asarray(batch.features)),
        jnp.asarray(batch.mask),
        jnp.asarray(batch.weight),
    )


def count_params(model: PyTree) -> int:
    leaves = jax.tree.leaves(params_of(model))
    return int(sum(np.prod(x.shape) for x in leaves))
