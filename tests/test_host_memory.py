"""sde_mol/host_memory.py: with freed memory kept, a jitted program's large buffers stop being faulted in anew
on every call; the environment switch leaves glibc's defaults. Each case runs in a fresh process, since the
settings must be made before JAX starts its backend."""

import json
import os
import subprocess
import sys

import pytest

from sde_mol import cli

PROGRAM = """
import json, resource
from sde_mol.host_memory import keep_freed_memory
applied = keep_freed_memory()
import equinox as eqx, jax, jax.numpy as jnp, jax.random as jr
from sde_mol.nn.egnn import EGNN
net = EGNN(6, 64, 2, key=jr.key(0))
params, static = eqx.partition(net, eqx.is_inexact_array)
x, h = jr.normal(jr.key(1), (64, 29, 3)), jr.normal(jr.key(2), (64, 29, 6))
mask = jnp.ones((64, 29), bool)
def loss(p):
    dx, ho = jax.vmap(eqx.combine(p, static), in_axes=(0, 0, 0, None))(x, h, mask, jnp.float32(0.5))
    return jnp.sum(dx**2) + jnp.sum(ho**2)
f = jax.jit(jax.grad(loss))  # an EGNN's backward pass: its edge activations are one large temporary
for _ in range(40):  # kept memory: the heap grows in a few steps over the first calls, then stays
    jax.block_until_ready(f(params))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    jax.block_until_ready(f(params))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps({"applied": applied, "faults_per_call": faults}))
"""


def _run(switch: str | None) -> dict:
    env = dict(os.environ)
    env.pop("SDE_MOL_KEEP_FREED_MEMORY", None)
    if switch is not None:
        env["SDE_MOL_KEEP_FREED_MEMORY"] = switch
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_is_not_faulted_in_again():
    kept = _run(None)
    if not kept["applied"]:
        pytest.skip("not glibc: keep_freed_memory() does nothing here")
    default = _run("off")
    assert default["applied"] is False
    assert kept["faults_per_call"] < 10_000
    if default["faults_per_call"] > 20_000:  # glibc's defaults (without transparent huge pages): ~84,000 here
        assert kept["faults_per_call"] < default["faults_per_call"] / 10


def test_recipes_keep_freed_memory_before_anything_else(monkeypatch):
    """`cli.run` makes the settings before it parses (so before any recipe starts JAX's backend)."""
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("keep"))
    assert cli.run(lambda cfg: calls + [cfg], lambda: calls.append("parse") or "cfg") == ["keep", "parse", "cfg"]
