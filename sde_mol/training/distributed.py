"""Data parallelism: one mesh axis "data" over all devices; the batch is sharded along it, the train state
replicated. XLA (GSPMD) partitions the jitted step and inserts the gradient all-reduce itself.

Single host, several devices (GPUs, or CPU devices for testing):

    python recipes/train_edm.py qm9-paper --train.data-parallel
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python recipes/train_edm.py qm9-small --train.data-parallel

Several hosts: start the same command on every host with the coordinator's address, the number of processes
and each process's id; `initialise()` (called first thing by the training recipe) reads them from the
environment and calls `jax.distributed.initialize`, after which `jax.devices()` lists the devices of all
hosts and the mesh spans them:

    # on host 0 (the coordinator; any free port) and host 1, e.g. 8 GPUs each, global batch 64 * 16:
    SDE_MOL_COORDINATOR=host0:12345 SDE_MOL_NUM_PROCESSES=2 SDE_MOL_PROCESS_ID=0 \\
        python recipes/train_edm.py qm9-paper --train.data-parallel --data.batch-size 1024
    SDE_MOL_COORDINATOR=host0:12345 SDE_MOL_NUM_PROCESSES=2 SDE_MOL_PROCESS_ID=1 \\
        python recipes/train_edm.py qm9-paper --train.data-parallel --data.batch-size 1024
    # under SLURM (or Open MPI, or on a TPU pod) the environment is detected, no variables needed:
    SDE_MOL_DISTRIBUTED=1 srun --nodes=2 --ntasks-per-node=1 python recipes/train_edm.py qm9-paper --train.data-parallel

Every process builds the same seeded global batch (the batch iterator is deterministic) and uploads only the
rows of its own devices (`shard_batch`); checkpoints and logs are written by process 0 only. Multi-host runs
are documented here but have not been tested in this repository (only one host is available); the
single-host multi-device path is tested (tests/test_distributed.py).
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

DATA_AXIS = "data"


def initialise(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join a multi-host JAX run (`jax.distributed.initialize`); call before any other JAX work.

    Arguments default to $SDE_MOL_COORDINATOR, $SDE_MOL_NUM_PROCESSES and $SDE_MOL_PROCESS_ID. With none of
    them set, $SDE_MOL_DISTRIBUTED=1 lets JAX detect a cluster (SLURM, Open MPI, TPU pods); otherwise this is
    a single-host run and nothing happens. Returns whether JAX's distributed runtime was initialised."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("SDE_MOL_COORDINATOR")
    if num_processes is None and "SDE_MOL_NUM_PROCESSES" in env:
        num_processes = int(env["SDE_MOL_NUM_PROCESSES"])
    if process_id is None and "SDE_MOL_PROCESS_ID" in env:
        process_id = int(env["SDE_MOL_PROCESS_ID"])
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit and env.get("SDE_MOL_DISTRIBUTED") != "1":
        return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def data_mesh(devices=None) -> Mesh:
    """A one-axis ("data") mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _global_array(x, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the same global value; each uploads its own shards
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
    """Host (or device) arrays of the global batch -> global arrays sharded along their first axis.
    The batch size must be divisible by `mesh.size`."""
    sharding = batch_sharding(mesh)
    for x in jax.tree.leaves(tree):
        if _is_array(x) and (np.ndim(x) == 0 or np.shape(x)[0] % mesh.size):
            raise ValueError(f"shard_batch: leading axis of shape {np.shape(x)} not divisible by {mesh.size}")
    return jax.tree.map(lambda x: _global_array(x, sharding) if _is_array(x) else x, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array leaf of `tree` (e.g. a TrainState) replicated on all devices of `mesh`."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: _global_array(x, sharding) if _is_array(x) else x, tree)


def constrain(tree: PyTree, mesh: Mesh, *, batch: bool) -> PyTree:
    """Inside jit: pin the array leaves of `tree` to batch-sharded (`batch=True`) or replicated layout."""
    sharding = batch_sharding(mesh) if batch else replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding) if _is_array(x) else x, tree)
