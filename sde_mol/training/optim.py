"""EDM's optimiser: AdamW (amsgrad), the adaptive gradient-norm clipping of the reference, an optional linear
warm-up and cosine decay of the learning rate.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int


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
