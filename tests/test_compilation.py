"""No recompilation: the training step compiles once per size bucket over a long mixed run, the validation
NLL once, and sampling once per (batch size, sampler structure); new weights, steps, keys and molecule sizes
never retrace. Traces are counted with `eqx.debug` (a trace of a jitted function is a compilation)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from sde_mol import samplers
from sde_mol.data.loader import BatchIterator, encode_split
from sde_mol.data.qm9 import load_qm9, qm9_info
from sde_mol.likelihood import vlb_nll
from sde_mol.molecule import Molecule
from sde_mol.objectives.denoising import EDMEpsLoss
from sde_mol.run.build import build_denoiser, optimizer_from
from sde_mol.run.configs import ModelConfig, ModelSpec, OptimConfig
from sde_mol.training.loop import LoopConfig, run_loop
from sde_mol.training.prefetch import host_batches, to_device
from sde_mol.training.state import init_state, make_step

BUCKETS = (16, 20, 29)
SPEC = ModelSpec(ModelConfig(hidden=8, n_layers=1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny EGNN trained for 24 steps on bucketed real QM9 batches; returns (state, step, capacities)."""
    info = qm9_info()
    split = load_qm9("valid").subset(slice(0, 400))
    iterator = BatchIterator(split, info, 16, seed=0, buckets=BUCKETS)
    caps = [b.positions.shape[1] for b, _ in zip(host_batches(iterator, 0), range(24), strict=False)]
    opt = optimizer_from(OptimConfig(lr=1e-3))
    step = make_step(EDMEpsLoss(info), opt, ema_decay=0.9, donate=True, max_traces=len(BUCKETS))
    state = init_state(build_denoiser(SPEC, key=jr.PRNGKey(0)), opt)
    out = tmp_path_factory.mktemp("run")
    common = dict(out_dir=out, save=lambda p, s: None, batch_size=16, to_device=to_device)
    batches = lambda start: host_batches(iterator, start)  # noqa: E731
    state = run_loop(state, step, batches, cfg=LoopConfig(steps=12, log_every=6, ckpt_every=100), **common)
    # a second invocation (as after a resume) reuses the compiled step
    state = run_loop(state, step, batches, cfg=LoopConfig(steps=24, log_every=6, ckpt_every=100), **common)
    return state, step, caps


def test_training_compiles_once_per_bucket(trained):
    state, step, caps = trained
    assert int(state.step) == 24
    assert set(caps) == set(BUCKETS) and len(caps) == 24  # mixed sizes, every bucket served, several times
    assert step.num_traces() == len(BUCKETS)


def test_step_trace_guard_raises():
    info = qm9_info()
    opt = optimizer_from(OptimConfig())
    step = make_step(EDMEpsLoss(info), opt, ema_decay=0.9, max_traces=1)
    state = init_state(build_denoiser(SPEC, key=jr.PRNGKey(0)), opt)
    split = load_qm9("valid").subset(slice(0, 8))
    pos, feat, mask = (jnp.asarray(a) for a in encode_split(split, info))
    key = jr.PRNGKey(0)

    def batch(cap):
        return Molecule(pos[:, :cap], feat[:, :cap]), mask[:, :cap], jnp.ones(8)

    state, _ = step(state, *batch(29), key)
    with pytest.raises(RuntimeError):
        step(state, *batch(27), key)


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=1)
def _nll_batch(denoiser, mols, masks, key):
    info = qm9_info()
    keys = jr.split(key, masks.shape[0])
    return jax.vmap(lambda m, k, kk: vlb_nll(denoiser, m, k, info, key=kk))(mols, masks, keys)


def test_evaluation_compiles_once(trained):
    state, _, _ = trained
    info = qm9_info()
    pos, feat, mask = (jnp.asarray(a) for a in encode_split(load_qm9("valid").subset(slice(0, 48)), info))
    models = [state.ema_model, state.model, build_denoiser(SPEC, key=jr.PRNGKey(1))]
    for i, den in enumerate(models):  # new weights, new chunks (molecules of other sizes), new keys
        chunk = slice(16 * i, 16 * (i + 1))
        nll = _nll_batch(den, Molecule(pos[chunk], feat[chunk]), mask[chunk], jr.PRNGKey(i))
        assert nll.shape == (16,) and np.all(np.isfinite(np.asarray(nll)))
    assert eqx.debug.get_num_traces(_nll_batch) == 1


def _call_sampler(sampler, model, mask, n_feat, *, key):
    return sampler(model, mask, n_feat, key=key)


_counted_ancestral = eqx.debug.assert_max_traces(_call_sampler, max_traces=None)


def test_sampling_compiles_once_per_batch_size_and_nfe(trained):
    state, _, _ = trained
    info = qm9_info()
    den = state.ema_model

    def sampler(model, n_steps):
        return eqx.Partial(_counted_ancestral, samplers.Ancestral(n_steps), model, n_feat=info.n_feat)

    a = samplers.sample_molecules(sampler(den, 4), 5, info, key=jr.PRNGKey(0), batch_size=4)
    assert eqx.debug.get_num_traces(_counted_ancestral) == 1
    # same batch size and steps: new key, other weights, a different n (last batch filled up) -> no retrace
    b = samplers.sample_molecules(sampler(state.model, 4), 3, info, key=jr.PRNGKey(1), batch_size=4)
    assert eqx.debug.get_num_traces(_counted_ancestral) == 1
    assert np.all(a.nfe == 5) and np.all(b.nfe == 5)
    # other steps (NFE) -> a second compilation, then cached again
    c = samplers.sample_molecules(sampler(den, 2), 4, info, key=jr.PRNGKey(2), batch_size=4)
    samplers.sample_molecules(sampler(den, 2), 4, info, key=jr.PRNGKey(3), batch_size=4)
    assert eqx.debug.get_num_traces(_counted_ancestral) == 2
    assert np.all(c.nfe == 3)
