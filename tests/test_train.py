"""The training machinery on a toy objective: frozen leaves, EMA, adaptive clipping, exact resume."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from sde_mol.molecule import Molecule
from sde_mol.objectives.base import AbstractObjective
from sde_mol.train import (
    TrainState,
    adaptive_clip,
    build_optimizer,
    count_params,
    ema_update,
    init_state,
    make_step,
    params_of,
)


class ToyModel(eqx.Module):
    net: eqx.nn.Linear
    frozen_table: jax.Array  # stands in for an SDE's gamma table: must never be trained


class ToyObjective(AbstractObjective):
    def loss_one(self, model, mol, mask, *, key, step, target=None):
        x = mol.features[0]
        noise = jr.normal(key, x.shape) * 0.01
        pred = model.net(x + noise)
        loss = jnp.sum((pred - 2.0 * x) ** 2) + 0.0 * jnp.sum(model.frozen_table)
        return loss, {"pred_mean": jnp.mean(pred)}


def _model(key=0):
    return ToyModel(eqx.nn.Linear(4, 4, key=jr.PRNGKey(key)), jnp.arange(5.0))


def _batch(i, n=8):
    feats = jr.normal(jr.PRNGKey(100 + i), (n, 3, 4))
    return Molecule(jnp.zeros((n, 3, 3)), feats), jnp.ones((n, 3), bool), jnp.ones(n)


def test_step_trains_only_net_and_updates_ema():
    model = _model()
    opt = build_optimizer(5e-2, clip="adaptive")
    state = init_state(model, opt)
    step = make_step(ToyObjective(), opt, ema_decay=0.9)
    losses = []
    prev = state
    for i in range(150):
        old_model = prev.model
        old_ema = prev.ema_model
        prev, aux = step(prev, *_batch(i), jr.PRNGKey(7))
        losses.append(float(aux["loss"]))
        if i == 0:
            # EMA: 0.9 * old_ema + 0.1 * new
            expect = 0.9 * old_ema.net.weight + 0.1 * prev.model.net.weight
            np.testing.assert_allclose(prev.ema_model.net.weight, expect, rtol=1e-5, atol=1e-7)
            assert not np.allclose(prev.model.net.weight, old_model.net.weight)
    assert int(prev.step) == 150
    assert losses[-1] < 0.2 * losses[0]
    np.testing.assert_array_equal(prev.model.frozen_table, jnp.arange(5.0))
    np.testing.assert_array_equal(prev.ema_model.frozen_table, jnp.arange(5.0))
    assert count_params(model) == 4 * 4 + 4


def test_resume_is_exact():
    opt = build_optimizer(1e-2)
    step = make_step(ToyObjective(), opt, ema_decay=0.99)
    key = jr.PRNGKey(3)
    s = init_state(_model(), opt)
    for i in range(10):
        s, _ = step(s, *_batch(i), key)
    # "checkpoint" at step 5 by replaying, then continue
    r = init_state(_model(), opt)
    for i in range(5):
        r, _ = step(r, *_batch(i), key)
    leaves, treedef = jax.tree.flatten(r)
    r = jax.tree.unflatten(treedef, [np.array(x) if eqx.is_array(x) else x for x in leaves])
    r = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, r)
    for i in range(5, 10):
        r, _ = step(r, *_batch(i), key)
    for a, b in zip(jax.tree.leaves(params_of(s.model)), jax.tree.leaves(params_of(r.model)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_adaptive_clip_matches_edm_rule():
    clip = adaptive_clip(queue_size=4, initial=3000.0)
    g = {"w": jnp.full((4,), 1e4)}  # norm 2e4 > 3000 -> clipped to max_norm = 1.5*3000 + 0 = 4500
    st = clip.init(g)
    out, st = clip.update(g, st)
    np.testing.assert_allclose(optax.tree.norm(out), 4500.0, rtol=1e-5)
    # queue now [4500, 3000]: max = 1.5 * 3750 + 2 * 750 = 7125; a small gradient passes unchanged
    small = {"w": jnp.full((4,), 1.0)}
    out, st = clip.update(small, st)
    np.testing.assert_allclose(out["w"], small["w"])
    assert np.allclose(np.asarray(st.queue[:3]), [2.0, 4500.0, 3000.0])
    big = {"w": jnp.full((4,), 1e5)}
    q = np.array([2.0, 4500.0, 3000.0])
    expect = 1.5 * q.mean() + 2 * q.std()
    out, st = clip.update(big, st)
    np.testing.assert_allclose(optax.tree.norm(out), expect, rtol=1e-5)


def test_ema_update_keeps_frozen_leaves_of_new():
    a, b = _model(0), _model(1)
    b = eqx.tree_at(lambda m: m.frozen_table, b, jnp.ones(5))
    e = ema_update(a, b, 0.5)
    np.testing.assert_allclose(e.net.weight, 0.5 * (a.net.weight + b.net.weight), rtol=1e-6)
    np.testing.assert_array_equal(e.frozen_table, jnp.ones(5))
    assert isinstance(e, ToyModel) and isinstance(init_state(a, optax.sgd(0.1)), TrainState)
