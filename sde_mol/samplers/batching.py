"""Host-side batching and decoding: draw n molecules with any sampler, in fixed-shape compiled batches.

`sample_molecules(sampler_fn, n, info, ...)` draws sizes M ~ p(M), groups molecules by size bucket, runs
`sampler_fn(mask, *, key) -> (molecule, nfe)` (e.g. `eqx.Partial(PFODE(), denoiser, n_feat=6)`) vmapped over
padded batches, and decodes to atoms on the host (`Samples`). Molecule i uses `jr.fold_in(key, i)` only.
"""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from ..data.qm9 import QM9_BUCKETS, DatasetInfo
from ..molecule import Molecule
from ..typing import Key, NodeMask
from .steps import NFE


def decode(
    mol: Molecule, mask: NodeMask, info: DatasetInfo
) -> tuple[Float[Array, "n_atoms 3"], Int[Array, " n_atoms"], Int[Array, " n_atoms"]]:
    """Normalised state -> (positions in Angstrom, atom type index (-1 on padding), charge (0 on padding)).

    EDM's inverse normalisation: positions * norm_x + b_x; atom type = argmax of the class channels (ties to
    the lowest index); charge = round-half-even(charge channel * norm_charge + b_charge), or the type's atomic
    number when the dataset has no charge channel."""
    (n_x, n_h, n_c), (b_x, b_h, b_c) = info.norm_values, info.norm_biases
    positions = (mol.positions * n_x + b_x) * mask[:, None]
    classes = mol.features[:, : info.n_types] * n_h + b_h
    types = jnp.where(mask, jnp.argmax(classes, axis=-1), -1).astype(jnp.int32)
    if info.include_charges:
        charge = jnp.round(mol.features[:, info.n_types] * n_c + b_c).astype(jnp.int32)
    else:
        charge = jnp.asarray(info.atomic_numbers, jnp.int32)[jnp.maximum(types, 0)]
    return positions, types, jnp.where(mask, charge, 0)


class Samples(NamedTuple):
    """Decoded molecules on the host, padded to `info.max_n_atoms` slots."""

    positions: np.ndarray  # (n, max_n_atoms, 3) float32, Angstrom, zero on padding
    atom_types: np.ndarray  # (n, max_n_atoms) int32, index into info.atom_decoder, -1 on padding
    charges: np.ndarray  # (n, max_n_atoms) int32, 0 on padding
    n_atoms: np.ndarray  # (n,) int32
    nfe: np.ndarray  # (n,) int32 denoiser evaluations per molecule
    finite: np.ndarray  # (n,) bool: every coordinate and feature of the real atoms is finite (else: a failure)


SamplerFn = Callable[..., tuple[Molecule, NFE]]  # (mask, *, key) -> (molecule, nfe)


def _draw_size(index: Int[Array, ""], key: Key, probs: Float[Array, " n_sizes"]) -> Int[Array, ""]:
    k_size, _ = jr.split(jr.fold_in(key, index))
    return jr.choice(k_size, probs.shape[0], p=probs).astype(jnp.int32)


_draw_sizes = jax.jit(jax.vmap(_draw_size, in_axes=(0, None, None)))


def draw_sizes(n: int, info: DatasetInfo, *, key: Key, start: int = 0) -> np.ndarray:
    """The sizes M_i ~ p(M) of molecules start..n-1 that `sample_molecules` uses (host int32 array)."""
    probs = jnp.asarray(info.size_probs(), jnp.float32)
    return np.asarray(_draw_sizes(jnp.arange(start, n, dtype=jnp.int32), key, probs))


def _sample_one(
    index: Int[Array, ""], n_atoms: Int[Array, ""], sampler_fn: SamplerFn, key: Key, info: DatasetInfo, capacity: int
):
    _, k_sample = jr.split(jr.fold_in(key, index))
    mask = jnp.arange(capacity) < n_atoms
    mol, nfe = sampler_fn(mask, key=k_sample)
    positions, types, charges = decode(mol, mask, info)
    finite = jnp.all(jnp.isfinite(mol.to_array()) | ~mask[:, None])
    return positions, types, charges, nfe, finite


# One compiled function per (batch size, capacity, sampler structure, info), cached across calls: `sampler_fn`'s
# arrays are traced, its non-array leaves (step counts, solver names), `info` and `capacity` are static.
_sample_batch = eqx.filter_jit(eqx.filter_vmap(_sample_one, in_axes=(0, 0, None, None, None, None)))


def capacities(sizes: np.ndarray, info: DatasetInfo, buckets: tuple[int, ...] | None) -> np.ndarray:
    """The padded width each molecule is sampled at: the smallest bucket that holds it (no buckets: the
    dataset's capacity). The largest bucket must be at least `info.max_n_atoms`."""
    caps = np.asarray(sorted(set(buckets)) if buckets else [info.max_n_atoms], np.int64)
    if caps[0] < 1 or caps[-1] < info.max_n_atoms:
        raise ValueError(
            f"size buckets {buckets}: expected positive capacities, the largest >= the dataset's maximum "
            f"of {info.max_n_atoms} atoms"
        )
    return caps[np.searchsorted(caps, sizes)]


def buckets_for(info: DatasetInfo, edges: tuple[int, ...] = QM9_BUCKETS) -> tuple[int, ...]:
    """The bucket widths `edges` below the dataset's capacity, then the capacity itself (QM9: (17, 20, 23, 29))."""
    return tuple(b for b in sorted(set(edges)) if b < info.max_n_atoms) + (info.max_n_atoms,)


PARTIAL_BATCH_MULTIPLE = 8
"""A bucket's last, partial chunk is padded to a multiple of this (not to the full batch size): sampling 50
molecules in 4 buckets at batch size 50 would otherwise run 200 slots for 50 molecules. One extra compilation
per bucket at most (cached on disk by the recipes), against up to a whole wasted batch per bucket."""


def _chunk_width(k: int, batch_size: int) -> int:
    """The padded batch of a chunk of k molecules: the batch size, or for a partial chunk the next multiple of
    PARTIAL_BATCH_MULTIPLE (at most the batch size)."""
    return min(batch_size, -(-k // PARTIAL_BATCH_MULTIPLE) * PARTIAL_BATCH_MULTIPLE)


def _chunks(n: int, info: DatasetInfo, key: Key, batch_size: int, start: int, buckets):
    """(rows, indices, sizes, capacity) per compiled call; each chunk is filled up to `_chunk_width`."""
    sizes = draw_sizes(n, info, key=key, start=start)
    caps = capacities(sizes, info, buckets)
    for cap in np.unique(caps):
        rows = np.nonzero(caps == cap)[0]
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            filled = np.concatenate([chunk, np.repeat(chunk[-1:], _chunk_width(len(chunk), batch_size) - len(chunk))])
            yield chunk, filled + start, sizes[filled], int(cap)


def compile_sampler(
    sampler_fn: SamplerFn,
    n: int,
    info: DatasetInfo,
    *,
    key: Key,
    batch_size: int,
    start: int = 0,
    buckets: tuple[int, ...] | None = None,
) -> None:
    """Compile ahead of time every batch function that `sample_molecules` with the same arguments will call
    (one per width and padded batch used), so that a following `sample_molecules` runs at steady-state speed."""
    shapes = {(len(index), cap) for _, index, _, cap in _chunks(n, info, key, batch_size, start, buckets)}
    for b, cap in sorted(shapes):
        index, sizes = jnp.arange(b, dtype=jnp.int32), jnp.full((b,), cap, jnp.int32)
        _sample_batch.lower(index, sizes, sampler_fn, key, info, cap).compile()


def sample_molecules(
    sampler_fn: SamplerFn,
    n: int,
    info: DatasetInfo,
    *,
    key: Key,
    batch_size: int,
    start: int = 0,
    buckets: tuple[int, ...] | None = None,
    progress: bool = False,
) -> Samples:
    """Draw molecules start..n-1: sizes M ~ p(M) (`info.size_probs()`), then `sampler_fn(mask, key=...)`.

    Molecule i uses `jr.fold_in(key, i)` only, so it is the same for every batch size and every `start`
    (sampling 0..b-1 then b..n-1 gives the same n molecules as 0..n-1 at once). Batches have a fixed shape
    (a partial last one is filled up to a multiple of 8 and trimmed), so sampling compiles once per batch shape
    and sampler. Pass
    `sampler_fn` as an `eqx.Partial` (e.g. `eqx.Partial(PFODE(), denoiser, n_feat=6)`) so that
    model weights are traced arguments rather than constants baked into the compiled program.

    `buckets` (e.g. (17, 20, 23, 29) for QM9): molecules are grouped by size and each group is sampled at the
    smallest bucket width that holds it instead of the full capacity (the EGNN's work grows with width^2),
    one compilation per bucket. A molecule's noise has the shape of its width, so molecule i is the same for
    every batch size and `start` under one bucket set, but differs between bucket sets. Outputs are padded
    to `info.max_n_atoms` slots either way. `progress`: a progress bar (molecules, molecules/s, ETA) on stderr.
    """
    m, width = n - start, info.max_n_atoms
    positions = np.zeros((m, width, 3), np.float32)
    types = np.full((m, width), -1, np.int32)
    charges = np.zeros((m, width), np.int32)
    n_atoms = np.zeros(m, np.int32)
    nfe = np.zeros(m, np.int32)
    finite = np.zeros(m, bool)
    bar = tqdm(total=m, unit="mol", desc="sampling", disable=not progress, smoothing=0.1)
    for rows, index, sizes, cap in _chunks(n, info, key, batch_size, start, buckets):
        out = jax.device_get(_sample_batch(jnp.asarray(index), jnp.asarray(sizes), sampler_fn, key, info, cap))
        k = len(rows)
        positions[rows, :cap], types[rows, :cap], charges[rows, :cap] = out[0][:k], out[1][:k], out[2][:k]
        n_atoms[rows], nfe[rows], finite[rows] = sizes[:k], out[3][:k], out[4][:k]
        bar.update(k)
    bar.close()
    return Samples(positions, types, charges, n_atoms, nfe, finite)
