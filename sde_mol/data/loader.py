"""Host-side batch iterator with fixed shapes and a seeded shuffle.

Every batch has exactly `batch_size` molecules padded to the dataset capacity (29 for QM9), so a jitted step
compiles once. With `drop_last=False` the last short batch is filled up with molecules from the start of the
epoch's order and carries a `weight` of 0 for those fill-ins, so no molecule is counted twice.
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
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.positions, self.features, self.mask = encode_split(split, info)
        self.n_atoms = split.n_atoms.astype(np.int32)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = self.positions.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        n = self.positions.shape[0]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def take(self, idx: np.ndarray, weight: np.ndarray | None = None) -> Batch:
        w = np.ones(len(idx), np.float32) if weight is None else weight
        return Batch(self.positions[idx], self.features[idx], self.mask[idx], self.n_atoms[idx], w)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        order = self.order(epoch)
        b = self.batch_size
        for i in range(len(self)):
            idx = order[i * b : (i + 1) * b]
            weight = np.ones(b, np.float32)
            if len(idx) < b:  # final short batch, only when drop_last=False
                weight[len(idx) :] = 0.0
                idx = np.concatenate([idx, order[: b - len(idx)]])
            yield self.take(idx, weight)

    def forever(self, start_epoch: int = 0) -> Iterator[Batch]:
        e = start_epoch
        while True:
            yield from self.epoch(e)
            e += 1
