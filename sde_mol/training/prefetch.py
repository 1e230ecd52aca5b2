"""Feeding the step: host batches from a global step on, their transfer to the device(s), and a background
thread that prepares the next device batch while the current step runs.
"""

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

import jax
import jax.numpy as jnp

from ..molecule import Molecule
from . import distributed

T = TypeVar("T")


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
    along the batch axis over the mesh (`distributed.shard_batch`: each process uploads only its rows). A batch
    that is already the step's arguments (a tuple of device arrays, e.g. states a teacher generated on the
    device) passes through unchanged; it cannot be sharded."""
    if isinstance(batch, tuple):
        if mesh is not None:
            raise ValueError("a batch generated on the device (e.g. trajectory states) cannot be sharded over a mesh")
        return batch
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
