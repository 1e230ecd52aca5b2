"""Host-side batch iterator with fixed shapes and a seeded shuffle.

Every batch has exactly `batch_size` molecules padded to a fixed capacity, so a jitted step compiles once per
capacity. Without buckets the capacity is the dataset's (29 for QM9). With `buckets=(17, 20, 23, 29)` each
molecule goes to the smallest bucket that holds it and every batch comes from one bucket, padded to that
bucket's capacity: QM9 averages 18 atoms, so this cuts the O(N^2) edge work to about half of padding everything
to 29 (experiments/NOTES.md, "QM9 size buckets"), at the price of one compilation per bucket. Batch order is shuffled
across buckets each epoch.

With `drop_last=False` a short batch is filled up with molecules from the start of its bucket's order and
carries a `weight` of 0 for those fill-ins, so no molecule is counted twice.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .qm9 import DatasetInfo, QM9Split


@dataclass(frozen=True)
class Batch:
    positions: np.ndarray  # (B, N, 3) float32, CoM-free over real atoms
    features: np.ndarray  # (B, N, n_feat) float32, normalised (EDM: one-hot / 4, Z / 10)
    mask: np.ndarray  # (B, N) bool
    n_atoms: np.ndarray  # (B,) int32
    weight: np.ndarray  # (B,) float32, 1 for real rows, 0 for fill-ins of a final short batch


def encode_split(split: QM9Split, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw split -> normalised state arrays (positions centred, features [one_hot/4 | Z/10]), mask."""
    mask = split.mask
    m = mask[..., None].astype(np.float32)
    nx, nh, nz = info.norm_values
    bx, bh, bz = info.norm_biases
    positions = (split.centred_positions() - bx) / nx * m
    feats = [(split.one_hot - bh) / nh * m]
    if info.include_charges:
        feats.append((split.charges[..., None].astype(np.float32) - bz) / nz * m)
    return positions.astype(np.float32), np.concatenate(feats, axis=-1).astype(np.float32), mask


class BatchIterator:
    """Iterate fixed-shape batches; epoch e is shuffled with seed (seed, e)."""

    def __init__(
        self,
        split: QM9Split,
        info: DatasetInfo,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        buckets: tuple[int, ...] | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.positions, self.features, self.mask = encode_split(split, info)
        self.n_atoms = split.n_atoms.astype(np.int32)
        capacity = self.positions.shape[1]
        buckets = (capacity,) if not buckets else tuple(sorted(buckets))
        if buckets[-1] < self.n_atoms.max() or buckets[-1] > capacity:
            raise ValueError(
                f"buckets {buckets}: the largest must hold the largest molecule ({self.n_atoms.max()} atoms) and "
                f"not exceed the capacity {capacity}"
            )
        self.buckets = buckets
        self.bucket_of = np.searchsorted(np.asarray(buckets), self.n_atoms)  # smallest bucket >= M
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last

    def _n_batches(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        counts = np.bincount(self.bucket_of, minlength=len(self.buckets))
        return int(sum(self._n_batches(int(c)) for c in counts))

    def order(self, epoch: int) -> np.ndarray:
        n = self.positions.shape[0]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def take(self, idx: np.ndarray, weight: np.ndarray | None = None, capacity: int | None = None) -> Batch:
        w = np.ones(len(idx), np.float32) if weight is None else weight
        c = self.positions.shape[1] if capacity is None else capacity
        return Batch(self.positions[idx, :c], self.features[idx, :c], self.mask[idx, :c], self.n_atoms[idx], w)

    def plan(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """The epoch's batches as (indices, weights, capacity), in the order they are served."""
        order = self.order(epoch)
        b = self.batch_size
        batches = []
        for k, cap in enumerate(self.buckets):
            members = order[self.bucket_of[order] == k]
            for i in range(self._n_batches(len(members))):
                idx = members[i * b : (i + 1) * b]
                weight = np.ones(b, np.float32)
                if len(idx) < b:  # short batch, only when drop_last=False
                    weight[len(idx) :] = 0.0
                    idx = np.concatenate([idx, np.resize(members, b - len(idx))])
                batches.append((idx, weight, cap))
        if self.shuffle and len(self.buckets) > 1:
            perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        for idx, weight, cap in self.plan(epoch):
            yield self.take(idx, weight, cap)

    def forever(self, start_epoch: int = 0) -> Iterator[Batch]:
        e = start_epoch
        while True:
            yield from self.epoch(e)
            e += 1
