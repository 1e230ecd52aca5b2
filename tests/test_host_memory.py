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


RELEASE = """
import ctypes, json
from sde_mol.host_memory import keep_freed_memory, release_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
size = 400 * 2**20
blocks = [libc.malloc(2**20) for _ in range(400)]  # 1 MiB blocks: heap memory, touched below
for b in blocks:
    ctypes.memset(b, 1, 2**20)
kept = resident()
for b in blocks:
    libc.free(b)
after_free = resident()
released = release_freed_memory()
print(json.dumps({"applied": applied, "kept": kept, "after_free": after_free, "after_release": resident(),
                  "released": released, "size": size}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc")
def test_release_hands_kept_memory_back():
    """With freed memory kept, 400 MiB of freed heap blocks stay resident; `release_freed_memory` returns them."""
    env = dict(os.environ)
    env.pop("SDE_MOL_KEEP_FREED_MEMORY", None)
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["applied"] and r["released"]
    assert r["after_free"] > r["kept"] - r["size"] // 4  # kept: freeing did not shrink the process
    assert r["after_release"] < r["kept"] - r["size"] * 3 // 4  # released: at least 300 of the 400 MiB
