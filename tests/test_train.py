"""The training machinery on a toy objective: frozen leaves, EMA, adaptive clipping, exact resume."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from sde_mol.molecule import Molecule
from sde_mol.objectives.base import AbstractObjective
from sde_mol.training.optim import adaptive_clip, build_optimizer
from sde_mol.training.state import TrainState, cast_params, count_params, ema_update, init_state, make_step, params_of


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


# --- speed features: donation, prefetch, mixed precision (issue 5) -----------------------------------------


def test_donated_step_equals_plain_step_and_consumes_the_state():
    opt = build_optimizer(1e-2)
    plain = make_step(ToyObjective(), opt, ema_decay=0.9)
    donated = make_step(ToyObjective(), opt, ema_decay=0.9, donate=True)
    key = jr.PRNGKey(1)
    a = b = None
    for i in range(4):
        a, _ = plain(init_state(_model(), opt) if a is None else a, *_batch(i), key)
        first = b is None
        old = init_state(_model(), opt) if first else b  # init_state shares model/ema buffers: handled
        b, _ = donated(old, *_batch(i), key)
        assert old.model.net.weight.is_deleted()  # consumed...
        assert not key.is_deleted()  # ...but never the key
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert plain.num_traces() == 1 and donated.num_traces() == 1


class TeacherObjective(AbstractObjective):
    """A distillation stand-in: regress the model on a teacher model held by the objective."""

    teacher: ToyModel

    def loss_one(self, model, mol, mask, *, key, step, target=None):
        x = mol.features[0]
        return jnp.sum((model.net(x) - self.teacher.net(x)) ** 2), {}


def test_donated_step_never_deletes_a_teacher_the_student_was_copied_from():
    """ECT-style students start as the teacher's own arrays; donating the state must not consume the teacher
    (which the objective holds and every later trace, e.g. a new size bucket, reads again)."""
    teacher = eqx.tree_at(lambda m: m.net.bias, _model(3), jnp.ones(4))
    student = teacher  # same buffers
    opt = build_optimizer(1e-2)
    step = make_step(TeacherObjective(teacher), opt, ema_decay=0.9, donate=True)
    state = init_state(student, opt)
    for n in (8, 6, 8):  # a second shape re-traces the step with the teacher as a constant
        state, aux = step(state, *_batch(n, n=n), jr.PRNGKey(0))
    assert not teacher.net.weight.is_deleted() and float(aux["loss"]) >= 0.0
    assert step.num_traces() == 2
    np.testing.assert_array_equal(teacher.net.bias, jnp.ones(4))


def test_prefetch_keeps_order_and_raises_in_consumer():
    from sde_mol.training.prefetch import prefetch

    assert list(prefetch(iter(range(20)), 3)) == list(range(20))

    def broken():
        yield 1
        raise KeyError("boom")

    it = prefetch(broken(), 2)
    assert next(it) == 1
    with pytest.raises(KeyError):
        next(it)
    endless = prefetch(iter(int, 1), 2)  # never ends; close() stops the thread
    assert next(endless) == 0
    endless.close()
    endless._thread.join(timeout=5)
    assert not endless._thread.is_alive()


def test_bf16_compute_keeps_f32_master_weights():
    from sde_mol.data.qm9 import EDM_TRAIN_SIZE_COUNTS, DatasetInfo
    from sde_mol.molecule import com_free_normal
    from sde_mol.objectives.denoising import EDMEpsLoss
    from sde_mol.run.build import build_denoiser
    from sde_mol.run.configs import ModelConfig, ModelSpec

    info = DatasetInfo(size_counts=tuple(EDM_TRAIN_SIZE_COUNTS.get(m, 0) for m in range(30)))
    den = build_denoiser(ModelSpec(ModelConfig(hidden=16, n_layers=2)), key=jr.PRNGKey(0))
    masks = jnp.arange(9)[None, :] < jnp.array([5, 9, 7, 3])[:, None]
    noise = jax.vmap(lambda k, m: com_free_normal(k, m, 6))(jr.split(jr.PRNGKey(1), 4), masks)
    mols = Molecule(noise.positions, jnp.abs(noise.features) * 0.25)
    opt = build_optimizer(1e-3)
    out = {}
    for name, dtype in (("f32", None), ("bf16", jnp.bfloat16)):
        step = make_step(EDMEpsLoss(info), opt, ema_decay=0.9, compute_dtype=dtype)
        state, aux = step(init_state(den, opt), mols, masks, jnp.ones(4), jr.PRNGKey(2))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_of(state.model)))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params_of(state.ema_model)))
        out[name] = (float(aux["loss"]), float(aux["grad_norm"]))
    np.testing.assert_allclose(out["bf16"], out["f32"], rtol=1e-2)
    # the network itself in bf16: matrix work in bf16, coordinates in f32
    net16 = cast_params(den, jnp.bfloat16).net
    dx, h = net16(mols.positions[1], mols.features[1], masks[1], jnp.asarray(0.5))
    dx32, h32 = den.net(mols.positions[1], mols.features[1], masks[1], jnp.asarray(0.5))
    assert dx.dtype == jnp.float32 and h.dtype == jnp.float32
    assert not np.array_equal(h, h32)  # it did run in bf16 (~1 % error), close to the f32 network
    np.testing.assert_allclose(dx, dx32, atol=0.03 * float(jnp.max(jnp.abs(dx32))))
    np.testing.assert_allclose(h, h32, atol=0.03 * float(jnp.max(jnp.abs(h32))))


def test_warmup_cosine_schedule_reaches_its_end_lr():
    """build_optimizer(warmup_steps, decay_steps, lr_end): Adam updates of a constant gradient are ~lr in size,
    so they trace the schedule: 0 at step 0, the peak after the warm-up, lr_end after the decay."""
    opt = build_optimizer(1.0, weight_decay=0.0, amsgrad=False, clip="none", warmup_steps=2, decay_steps=4, lr_end=0.1)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    sizes = []
    for _ in range(8):
        updates, state = opt.update({"w": jnp.ones(3)}, state, params)
        sizes.append(float(jnp.abs(updates["w"][0])))
    np.testing.assert_allclose(sizes[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(sizes[2], 1.0, rtol=1e-4)
    np.testing.assert_allclose(sizes[6:], [0.1, 0.1], rtol=1e-4)
    assert sizes[3] > sizes[4] > sizes[5] > 0.1


def test_a_diverging_loss_leaves_valid_json_and_the_last_good_state(tmp_path):
    """The NaN guard: the loss turns NaN at step 3; nan_report.json and every metrics.jsonl row are strict JSON
    (NaN as the string "nan"), last.eqx keeps the step-2 state, the diverged one goes to nan_state.eqx."""
    import json

    from sde_mol.training.loop import LoopConfig, run_loop

    def step_fn(state, batch, key):
        step = state.step + 1
        loss = jnp.where(step >= 3, jnp.nan, 1.0 / step)
        return TrainState({}, {}, None, (), step), {"loss": loss, "grad_norm": jnp.inf}

    saved = {}

    def save(path, st):
        saved[path.name] = int(st.step)
        path.write_text(str(int(st.step)))

    cfg = LoopConfig(steps=10, log_every=1, ckpt_every=2, eval_every=100, prefetch=0)
    state = TrainState({}, {}, None, (), jnp.array(0, jnp.int32))
    batches = lambda start: iter(lambda: (None,), 0)  # noqa: E731  endless dummy batches
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3: see .*nan_report.json; the last good"):
        run_loop(state, step_fn, batches, cfg=cfg, out_dir=tmp_path, save=save, batch_size=1, to_device=lambda b: b)
    report = json.loads((tmp_path / "nan_report.json").read_text(), parse_constant=pytest.fail)
    assert report["step"] == 3 and report["loss"] == "nan" and report["grad_norm"] == "inf"
    rows = [
        json.loads(line, parse_constant=pytest.fail) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["diverged"]
    assert saved == {"last.eqx": 2, "nan_state.eqx": 3}
