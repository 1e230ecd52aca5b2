"""Training: TrainState, one jitted step (loss, grad, optax update, EMA, target update) and the one loop.

Trainable parameters are the inexact-array leaves of `model.net`; everything else in a model (the SDE and its
schedule table, preconditioning constants) is frozen by construction, so the optimiser never touches it.

Randomness: the key of step k is `fold_in(base_key, k)`, and the data order of epoch e is a seeded shuffle,
so a run resumed from a checkpoint continues exactly as an uninterrupted one.

Speed (issue 5; `tools/benchmark.py` measures it): the step can donate the train state's buffers (the update
then happens in place), run the network in bfloat16 on float32 master weights (`compute_dtype`), and shard the
batch over several devices (`mesh`, see `distributed.py`); the loop prepares the next device batch in a
background thread while the current step runs (`prefetch`). Every one of these leaves the maths unchanged.
"""

import json
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PyTree

from . import distributed
from .checkpoint import remove_stale_temp_files
from .molecule import Molecule
from .objectives.base import AbstractObjective
from .typing import Key

T = TypeVar("T")


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


def compute_dtype_from(precision: str):
    """ "f32" -> None (the weights' own dtype), "bf16" -> jnp.bfloat16: `make_step`'s `compute_dtype`."""
    dtypes = {"f32": None, "bf16": jnp.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(dtypes)}")
    return dtypes[precision]


def cast_params(model: PyTree, dtype) -> PyTree:
    """`model` with its trainable leaves (those of `model.net`) cast to `dtype`; frozen leaves unchanged.
    Differentiable: gradients flow back to the original dtype."""
    spec = trainable_filter(model)
    return jax.tree.map(lambda x, s: x.astype(dtype) if s else x, model, spec)


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
    decay_steps: int = 0,
    lr_end: float = 0.0,
) -> optax.GradientTransformation:
    """EDM's optimiser: AdamW (amsgrad, weight decay 1e-12, constant lr) with adaptive clipping.
    `clip` is "adaptive", "none" or a number (fixed global-norm clipping). `warmup_steps`: linear warm-up from 0
    to `lr`; `decay_steps` > 0: then a cosine decay from `lr` to `lr_end` over that many steps (fine-tuning)."""
    parts = []
    if clip == "adaptive":
        parts.append(adaptive_clip())
    elif clip != "none":
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(optax.scale_by_amsgrad(b1, b2, eps) if amsgrad else optax.scale_by_adam(b1, b2, eps))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if decay_steps:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, warmup_steps + decay_steps, lr_end)
    else:
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
    donate: bool = False,
    compute_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    max_traces: int | None = None,
) -> Callable:
    """One training step in ONE `eqx.filter_jit`: loss, grad, optax update, EMA and target update.
    Returns step(state, mols, masks, weights, key) -> (state, aux).

    * `donate`: donate the state's buffers to the step, so XLA updates parameters, EMA and optimiser moments
      in place instead of allocating a second copy of each. The state passed in is consumed (its arrays are
      deleted; use the returned one). The batch and the base key are never donated. Off by default because a
      caller may keep a reference to an old state; `run_loop` never does, so recipes turn it on.
    * `compute_dtype`: e.g. `jnp.bfloat16`; the loss runs on a copy of the trainable weights cast to it
      (mixed precision: float32 master weights, gradients, optimiser and EMA). None = the weights' dtype.
    * `mesh`: data parallelism over `mesh`'s "data" axis (`distributed.data_mesh()`): the batch is sharded
      along its first axis and the state replicated (sharding constraints in the step; lay inputs out with
      `distributed.shard_batch` / `distributed.replicate`). The result equals the single-device step up to
      the order of the batch reduction.
    * `max_traces`: raise `RuntimeError` if the step is traced (compiled) more often, e.g. once per size
      bucket. `step.num_traces()` returns the number of traces so far either way.
    """

    def update(state: TrainState, mols: Molecule, masks, weights, key: Key):
        if mesh is not None:
            state = distributed.constrain(state, mesh, batch=False)
            mols, masks, weights = distributed.constrain((mols, masks, weights), mesh, batch=True)
        model = state.model
        spec = trainable_filter(model)
        params, static = eqx.partition(model, spec)
        skey = jr.fold_in(key, state.step)
        target = None if state.target_model is None else jax.lax.stop_gradient(state.target_model)
        target_c = target if compute_dtype is None or target is None else cast_params(target, compute_dtype)

        def loss_fn(p):
            if compute_dtype is not None:
                p = jax.tree.map(lambda x: x.astype(compute_dtype), p)
            m = eqx.combine(p, static)
            return objective.batch_loss(m, mols, masks, weights, key=skey, step=state.step, target=target_c)

        (loss, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = eqx.apply_updates(params, updates)
        model = eqx.combine(params, static)
        ema_model = ema_update(state.ema_model, model, ema_decay)
        if target is not None:
            decay = target_decay(state.step) if target_decay is not None else 0.0
            target = ema_update(target, model, decay)
        aux = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
        new = TrainState(model, ema_model, target, opt_state, state.step + 1)
        if mesh is not None:
            new, aux = distributed.constrain((new, aux), mesh, batch=False)
        return new, aux

    counted = eqx.debug.assert_max_traces(update, max_traces=max_traces)
    if donate:
        # donate="all-except-first" donates the second argument only: the state. Never the key, which the loop
        # passes again every step, nor the batch, which a caller may reuse.
        jitted = eqx.filter_jit(lambda rest, state: counted(state, *rest), donate="all-except-first")
        last = [lambda: None]  # weak reference to the state this step returned last

        def step(state: TrainState, mols: Molecule, masks, weights, key: Key):
            if state is not last[0]():  # a state of our own making never shares buffers: skip the check
                # nor may it share them with the objective (a distillation teacher whose network the student
                # was copied from): donating those would delete the teacher's weights
                state = _unalias(state, _buffers(objective))
            new, aux = jitted((mols, masks, weights, key), state)
            last[0] = weakref.ref(new)
            return new, aux

    else:
        jitted = eqx.filter_jit(counted)

        def step(state: TrainState, mols: Molecule, masks, weights, key: Key):
            return jitted(state, mols, masks, weights, key)

    step.num_traces = lambda: eqx.debug.get_num_traces(counted)
    return step


def _array_buffers(x: jax.Array) -> set:
    return {(s.device.id, s.data.unsafe_buffer_pointer()) for s in x.addressable_shards}


def _buffers(tree: PyTree) -> set:
    """The device buffers of every (live) array leaf of `tree`."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.Array))
    return set().union(*(_array_buffers(x) for x in leaves if isinstance(x, jax.Array) and not x.is_deleted()))


def _unalias(tree: PyTree, taken: set = frozenset()) -> PyTree:
    """Copy every array leaf whose buffer already occurred earlier in `tree` or is in `taken`: XLA refuses to
    donate one buffer twice, `init_state` makes `ema_model` the same arrays as `model` (a `device_put` of both
    keeps them sharing buffers), and a student copied from a teacher shares the teacher's arrays. Host-side;
    it compares buffer addresses."""
    seen = set(taken)

    def fresh(x):
        if not isinstance(x, jax.Array):
            return x
        buffers = _array_buffers(x)
        if buffers & seen:
            return jnp.copy(x)
        seen.update(buffers)
        return x

    return jax.tree.map(fresh, tree)


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
    prefetch: int = 2
    """device batches prepared ahead in a background thread while the step runs (0 = inline)"""
    data_parallel: bool = False
    """shard every batch over all devices (jax.devices(), all hosts after `distributed.initialise()`),
    parameters replicated; the batch size must be divisible by the device count"""
    eval_at_start: bool = False
    """evaluate once before the first step of a fresh run (the starting point of the curve)"""
    precision: Literal["f32", "bf16"] = "f32"
    """network compute dtype (bf16: mixed precision with float32 master weights; for GPUs, slow on most CPUs).
    Read by the recipe when it builds the step (`compute_dtype_from`)"""


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
    to_device: Callable[..., tuple],
) -> TrainState:
    """The one Python training loop: steps, progress line, metrics.jsonl, periodic evaluation, checkpoints
    (last.eqx always; best.eqx by `best_key`, lower is better), wall-clock budget, resume by `state.step`.

    `batches(start_step)` yields host batches from the given global step on (so resume is exact);
    `to_device(batch)` turns one into the step function's (mols, masks, weights) arguments; with
    `cfg.data_parallel` it is called as `to_device(batch, mesh=mesh)` (as `train.to_device` accepts) and the
    state is replicated over the mesh first. `cfg.prefetch` batches are prepared ahead in a background thread.
    With several processes (`distributed.initialise`) every process runs this loop over the same seeded
    batches and uploads its own rows; only process 0 writes files and prints."""
    main_process = jax.process_index() == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    key = jr.PRNGKey(cfg.seed)
    start = int(state.step)
    t_start = time.perf_counter()
    deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes else None
    best = _read_best(out_dir, best_key)
    put = to_device
    if cfg.data_parallel:
        mesh = distributed.data_mesh()
        if batch_size % mesh.size:
            raise ValueError(f"data_parallel: batch size {batch_size} is not divisible by {mesh.size} devices")
        state = distributed.replicate(state, mesh)

        def put(batch):
            return to_device(batch, mesh=mesh)

    device_batches = (put(b) for b in batches(start))
    it = prefetch(device_batches, cfg.prefetch) if cfg.prefetch > 0 else device_batches

    if main_process:
        _truncate_log(out_dir / "metrics.jsonl", start)
        for stale in remove_stale_temp_files(out_dir):
            print(f"removed {stale}, a temp file of an interrupted checkpoint write", flush=True)

    def record(obj):
        if main_process:
            with open(out_dir / "metrics.jsonl", "a") as log:
                log.write(json.dumps(_jsonable(obj), allow_nan=False) + "\n")

    def checkpoint(name, st):
        if main_process:
            save(out_dir / name, st)

    def run_evaluation(st, at_step):
        nonlocal best
        metrics = evaluate(st)
        record({"step": at_step, "time": time.time(), "eval": metrics})
        if main_process:
            print(f"eval @ {at_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        if best_key is not None and metrics.get(best_key) is not None and metrics[best_key] < best:
            best = metrics[best_key]
            checkpoint("best.eqx", st)
            if main_process:
                (out_dir / "best.json").write_text(json.dumps({"step": at_step, best_key: best}))

    step = start
    if evaluate is not None and cfg.eval_at_start and not (out_dir / "metrics.jsonl").exists():
        run_evaluation(state, step)
    try:
        while step < cfg.steps:
            state, aux = step_fn(state, *next(it), key)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                aux = {k: float(v) for k, v in aux.items()}
                if not math.isfinite(aux["loss"]):
                    _report_divergence(out_dir, step, aux, main_process)
                    checkpoint("nan_state.eqx", state)
                    raise FloatingPointError(
                        f"loss is {aux['loss']} at step {step}: see {out_dir / 'nan_report.json'}; the last good "
                        f"state is {out_dir / 'last.eqx'} (the diverged one: nan_state.eqx, load it with "
                        "allow_nonfinite=True)"
                    )
                eta_budget = None if deadline is None else deadline - time.perf_counter()
                line, sps = _progress_line(step, cfg.steps, t_start, start, batch_size, aux, eta_budget)
                if main_process:
                    print(line, flush=True)
                record({"step": step, "time": time.time(), "steps_per_s": sps, **aux})
            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                run_evaluation(state, step)
            out_of_time = deadline is not None and time.perf_counter() > deadline
            if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
                checkpoint("last.eqx", state)
            if out_of_time:
                if main_process:
                    print(
                        f"wall-clock budget of {cfg.max_minutes} min spent at step {step}; resume with --resume "
                        f"{out_dir / 'last.eqx'}",
                        flush=True,
                    )
                break
    finally:
        if isinstance(it, Prefetch):
            it.close()
    return state


def _json_number(v: float) -> float | str:
    """A float as JSON allows it: NaN and infinities become the strings "nan", "inf", "-inf"."""
    return v if math.isfinite(v) else str(v)


def _jsonable(obj):
    """`obj` (nested dicts of numbers) with every non-finite float as a string: metrics.jsonl stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return _json_number(obj) if isinstance(obj, float) else obj


def _report_divergence(out_dir: Path, step: int, aux: dict[str, float], main_process: bool) -> None:
    """nan_report.json (valid JSON: non-finite numbers as strings) and a metrics.jsonl row for the step at
    which the loss stopped being finite; last.eqx keeps the last good state."""
    report = _jsonable({"step": step, "time": time.time(), "diverged": True, **aux})
    if main_process:
        (out_dir / "nan_report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        with open(out_dir / "metrics.jsonl", "a") as log:
            log.write(json.dumps(report, allow_nan=False) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop the rows of an earlier run's metrics.jsonl logged after `step` (a run resumed from an older
    checkpoint logs those steps again); written atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


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


def to_device(batch, *, mesh: jax.sharding.Mesh | None = None) -> tuple:
    """A host batch -> the step's (mols, masks, weights) device arrays; with `mesh`, global arrays sharded
    along the batch axis over the mesh (`distributed.shard_batch`: each process uploads only its rows)."""
    arrays = (batch.positions, batch.features, batch.mask, batch.weight)
    if mesh is not None:
        positions, features, mask, weight = distributed.shard_batch(arrays, mesh)
    else:
        positions, features, mask, weight = (jnp.asarray(a) for a in arrays)
    return Molecule(positions, features), mask, weight


class Prefetch(Generic[T]):
    """Iterate `source` in a background thread, up to `size` items ahead of the consumer.

    For the training loop: `source` yields device batches (host slicing plus the host-to-device copy), which
    are then ready when the step, dispatched asynchronously, returns control. Order is preserved, so a seeded
    run is unchanged. An exception in `source` is raised in the consumer at the item where it happened.
    `close()` stops the thread and waits for it (it finishes the item it is producing first)."""

    _END = object()

    def __init__(self, source: Iterator[T], size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="sde_mol-prefetch")
        self._thread.start()

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put((True, item)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((False, e))
            return
        self._put((True, self._END))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetch[T]":
        return self

    def __next__(self) -> T:
        if self._stop.is_set():
            raise StopIteration
        ok, item = self._queue.get()
        if not ok:
            self.close()
            raise item
        if item is self._END:
            self.close()
            raise StopIteration
        return item

    def close(self, timeout: float = 60.0) -> None:
        """Stop the producer and wait for it (it finishes the item in hand, then sees the flag), dropping the
        queued items. Waiting matters: a daemon thread still inside an XLA transfer when the interpreter shuts
        down aborts the process (seen with jaxlib 0.10 on a multi-device CPU mesh)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break


def prefetch(source: Iterator[T], size: int = 2) -> "Prefetch[T]":
    """`Prefetch(source, size)`: iterate `source` in a background thread, `size` items ahead."""
    return Prefetch(iter(source), size)


def count_params(model: PyTree) -> int:
    leaves = jax.tree.leaves(params_of(model))
    return int(sum(np.prod(x.shape) for x in leaves))
