"""Data parallelism: a training step with the batch sharded over 2 (CPU) devices equals the single-device step.

XLA reads `--xla_force_host_platform_device_count` when JAX initialises, so the check runs in a subprocess
with that flag; the subprocess prints the differences as JSON and this test asserts on them."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from sde_mol.training import distributed

SCRIPT = textwrap.dedent(
    r"""
    import json, sys, tempfile
    from pathlib import Path

    import jax, jax.numpy as jnp, jax.random as jr, numpy as np

    from sde_mol.training import distributed
    from sde_mol.run.configs import ModelConfig, ModelSpec, OptimConfig
    from sde_mol.run.build import build_denoiser, optimizer_from
    from sde_mol.data.loader import Batch
    from sde_mol.data.qm9 import EDM_TRAIN_SIZE_COUNTS, DatasetInfo
    from sde_mol.objectives.denoising import EDMEpsLoss
    from sde_mol.training.loop import LoopConfig, run_loop
    from sde_mol.training.state import init_state, make_step, params_of
    from sde_mol.training.prefetch import to_device

    assert len(jax.devices()) == 2, jax.devices()
    info = DatasetInfo(size_counts=tuple(EDM_TRAIN_SIZE_COUNTS.get(m, 0) for m in range(30)))
    spec = ModelSpec(ModelConfig(hidden=16, n_layers=2))
    opt = optimizer_from(OptimConfig(lr=1e-3))
    objective = EDMEpsLoss(info)
    key = jr.PRNGKey(3)

    def host_batch(i, b=8, n=9):
        rng = np.random.default_rng(i)
        n_atoms = rng.integers(3, n + 1, size=b)
        mask = np.arange(n)[None, :] < n_atoms[:, None]
        pos = rng.normal(size=(b, n, 3)).astype(np.float32) * mask[..., None]
        pos = (pos - pos.sum(1, keepdims=True) / n_atoms[:, None, None]) * mask[..., None]
        feat = np.zeros((b, n, 6), np.float32)
        feat[np.arange(b)[:, None], np.arange(n)[None, :], rng.integers(0, 5, size=(b, n))] = 0.25
        feat[..., 5] = 0.6
        feat *= mask[..., None]
        weight = np.ones(b, np.float32)
        weight[-1] = 0.0
        return Batch(pos.astype(np.float32), feat, mask, n_atoms.astype(np.int32), weight)

    def fresh_state():
        return init_state(build_denoiser(spec, key=jr.PRNGKey(0)), opt)

    def leaves(state):
        return [np.asarray(x) for x in jax.tree.leaves((params_of(state.model), params_of(state.ema_model)))]

    def max_diff(a, b):
        return max(float(np.max(np.abs(x - y), initial=0.0)) for x, y in zip(a, b, strict=True))

    out = {}
    # 1) one step on 1 device vs the same step on a 2-device mesh
    step1 = make_step(objective, opt, ema_decay=0.99)
    s1, aux1 = step1(fresh_state(), *to_device(host_batch(0)), key)
    mesh = distributed.data_mesh()
    step2 = make_step(objective, opt, ema_decay=0.99, mesh=mesh, donate=True)
    batch2 = to_device(host_batch(0), mesh=mesh)
    s2, aux2 = step2(distributed.replicate(fresh_state(), mesh), *batch2, key)
    out["step_param_diff"] = max_diff(leaves(s1), leaves(s2))
    out["step_loss"] = [float(aux1["loss"]), float(aux2["loss"])]
    out["update_size"] = max_diff(leaves(fresh_state()), leaves(s1))
    out["batch_devices"] = len(batch2[1].sharding.device_set)
    out["batch_shard_rows"] = sorted({s.data.shape[0] for s in batch2[1].addressable_shards})
    out["state_replicated"] = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(s2))
    out["state_devices"] = len(jax.tree.leaves(s2)[0].sharding.device_set)

    # 2) the loop route: LoopConfig(data_parallel=True) vs a plain run, 3 steps
    finals = []
    for dp in (False, True):
        with tempfile.TemporaryDirectory() as d:
            cfg = LoopConfig(steps=3, log_every=1, ckpt_every=100, data_parallel=dp)
            step = make_step(objective, opt, ema_decay=0.99, donate=True)
            st = run_loop(fresh_state(), step, lambda start: (host_batch(i) for i in range(start, 100)), cfg=cfg,
                          out_dir=Path(d), save=lambda p, s: None, batch_size=8, to_device=to_device)
            finals.append((leaves(st), len(jax.tree.leaves(st)[0].sharding.device_set), int(st.step)))
    out["loop_param_diff"] = max_diff(finals[0][0], finals[1][0])
    out["loop_devices"] = [finals[0][1], finals[1][1]]
    out["loop_steps"] = [finals[0][2], finals[1][2]]
    print("RESULT " + json.dumps(out))
    """
)


def test_two_devices_equal_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT ") :])
    assert r["batch_devices"] == 2 and r["batch_shard_rows"] == [4]
    assert r["state_replicated"] and r["state_devices"] == 2
    assert r["step_loss"][0] == pytest.approx(r["step_loss"][1], rel=1e-5)
    assert r["update_size"] > 1e-4  # lr 1e-3: the step moved the parameters...
    assert r["step_param_diff"] < 1e-3 * r["update_size"], r  # ...and both layouts moved them alike
    assert r["loop_devices"] == [1, 2] and r["loop_steps"] == [3, 3]
    assert r["loop_param_diff"] < 1e-3 * r["update_size"], r


def test_single_device_helpers():
    mesh = distributed.data_mesh()
    assert mesh.axis_names == (distributed.DATA_AXIS,) and mesh.size == len(jax.devices())
    assert distributed.initialise() is False or "SDE_MOL_COORDINATOR" in os.environ
    with pytest.raises(ValueError, match="divisible"):
        distributed.shard_batch(jax.numpy.zeros(()), mesh)
