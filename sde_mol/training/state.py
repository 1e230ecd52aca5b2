"""The training state and ONE jitted step: loss, gradient, optax update, EMA and target update.

Trainable parameters are the inexact-array leaves of `model.net`; everything else in a model (the SDE and its
schedule table, preconditioning constants) is frozen by construction, so the optimiser never touches it. The
key of step k is `fold_in(base_key, k)`. The step can donate the state's buffers (an in-place update), run the
network in bfloat16 on float32 master weights (`compute_dtype`) and shard the batch over devices (`mesh`); none
of these changes the maths.
"""

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PyTree

from ..data.fixed import tiled_batch
from ..molecule import Molecule
from ..objectives.base import AbstractObjective
from ..typing import HasNet, Key
from . import distributed


class TrainState(eqx.Module):
    """A model (usually `HasNet`: what `make_step` trains), its EMA, an optional target model (consistency and
    progressive distillation), the optimiser state and the step; the loop itself needs only `step`."""

    model: PyTree
    ema_model: PyTree
    target_model: PyTree | None
    opt_state: PyTree
    step: Int[Array, ""]


def trainable_filter(model: HasNet) -> PyTree:
    """Filter spec: True on the inexact-array leaves of `model.net`, False elsewhere."""
    spec = jax.tree.map(lambda _: False, model)
    return eqx.tree_at(lambda m: m.net, spec, replace=jax.tree.map(eqx.is_inexact_array, model.net))


def params_of(model: HasNet) -> PyTree:
    return eqx.filter(model, trainable_filter(model))


def compute_dtype_from(precision: str):
    """ "f32" -> None (the weights' own dtype), "bf16" -> jnp.bfloat16: `make_step`'s `compute_dtype`."""
    dtypes = {"f32": None, "bf16": jnp.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(dtypes)}")
    return dtypes[precision]


def cast_params(model: HasNet, dtype) -> HasNet:
    """`model` with its trainable leaves (those of `model.net`) cast to `dtype`; frozen leaves unchanged.
    Differentiable: gradients flow back to the original dtype."""
    spec = trainable_filter(model)
    return jax.tree.map(lambda x, s: x.astype(dtype) if s else x, model, spec)


def init_state(model: HasNet, optimizer: optax.GradientTransformation, *, with_target: bool = False) -> TrainState:
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

    mols: Molecule | PyTree
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

    def update(state: TrainState, mols: Molecule | PyTree, masks, weights, key: Key):
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

        def step(state: TrainState, mols: Molecule | PyTree, masks, weights, key: Key):
            if state is not last[0]():  # a state of our own making never shares buffers: skip the check
                # nor may it share them with the objective (a distillation teacher whose network the student
                # was copied from): donating those would delete the teacher's weights
                state = _unalias(state, _buffers(objective))
            new, aux = jitted((mols, masks, weights, key), state)
            last[0] = weakref.ref(new)
            return new, aux

    else:
        jitted = eqx.filter_jit(counted)

        def step(state: TrainState, mols: Molecule | PyTree, masks, weights, key: Key):
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


def fit_tiled(
    objective: AbstractObjective,
    model: PyTree,
    data: Molecule,
    mask: Bool[Array, " n_atoms"],
    *,
    steps: int,
    batch: int,
    lr: float,
    lr_decay: float,
    key: Key,
    with_target: bool = False,
    target_decay: Callable[[Int[Array, ""]], Float[Array, ""]] | None = None,
) -> PyTree:
    """Fit `model` to a few molecules held in memory (`data`: a leading K axis, one `mask`) and return the final
    model (no EMA): `steps` calls of `make_step` on the one batch `data.fixed.tiled_batch(data, mask, batch)`,
    Adam at the learning rate lr * lr_decay^(-k / steps) at step k. The loop of small students against an exact
    oracle (tests, experiments/), which need no data pipeline, logging or checkpoints (`run_loop` runs the
    recipes). A FloatingPointError when the last loss is not finite."""
    if steps < 1:
        raise ValueError(f"fit_tiled: steps={steps} must be >= 1")
    optimizer = optax.chain(
        optax.scale_by_adam(), optax.scale_by_schedule(lambda c: -lr * (1.0 / lr_decay) ** (c / steps))
    )
    state = init_state(model, optimizer, with_target=with_target)
    step = make_step(objective, optimizer, ema_decay=0.0, target_decay=target_decay, max_traces=1)
    mols, masks, weights = tiled_batch(data, mask, batch)
    for _ in range(steps):
        state, aux = step(state, mols, masks, weights, key)
    loss = float(aux["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"fit_tiled: the loss is {loss} after {steps} steps")
    return state.model


def count_params(model: PyTree) -> int:
    leaves = jax.tree.leaves(params_of(model))
    return int(sum(np.prod(x.shape) for x in leaves))
