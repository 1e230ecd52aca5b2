"""Fixed data sets: a few molecules held in memory with their exact denoiser (oracle teachers, studies, tests).

`qm9_oracle`: the first n QM9 train molecules with `n_atoms` atoms (one node mask), each under R fixed random
rotations: the data distribution is the empirical one of the n R molecules {Q_r x_k}, whose E[x0 | z_t] the
`OracleDenoiser` computes exactly (Q_r drawn with `fold_in(PRNGKey(seed + 1), r)`; R = 1: the stored frames).

`toy_oracle`: the same for K random molecule-like point clouds (`oracle.toy_molecules`), no data set needed.

`uniform_batches`: host batches of an oracle's K molecules, batch k holding rows i_1..i_B ~ U{0, ..., K - 1}
drawn by `np.random.default_rng([data_seed, k])`, so a run resumed at step k sees what an uninterrupted one would.

`tiled_batch`: the K molecules repeated to fill one device batch (every step sees every molecule).
"""

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from ..molecule import Molecule
from ..oracle import OracleDenoiser, rotation_augmented, toy_molecules
from ..sde import AbstractSDE
from ..typing import BatchNodeMask, NodeMask
from .loader import Batch, encode_split
from .qm9 import load_qm9, qm9_info


def qm9_oracle(n: int, n_atoms: int, sde: AbstractSDE, *, rotations: int, seed: int) -> OracleDenoiser:
    """The exact denoiser (on `sde`) of the first `n` QM9 train molecules with `n_atoms` atoms, each under
    `rotations` fixed random rotations (1: as stored) drawn from `PRNGKey(seed + 1)`. A ValueError when the
    split has fewer than n such molecules."""
    train = load_qm9("train")
    idx = np.flatnonzero(train.n_atoms == n_atoms)[:n]
    if len(idx) < n:
        raise ValueError(f"QM9's train split has only {len(idx)} molecules of {n_atoms} atoms (asked for {n})")
    pos, feat, mask = encode_split(train.subset(idx), qm9_info())
    data, mask = Molecule(jnp.asarray(pos), jnp.asarray(feat)), jnp.asarray(mask[0])
    if rotations > 1:
        return rotation_augmented(data, mask, sde, rotations, key=jr.PRNGKey(seed + 1))
    return OracleDenoiser(data, mask, sde)


def toy_oracle(
    sde: AbstractSDE, *, n_molecules: int = 4, n_atoms: int = 7, capacity: int = 9, seed: int = 0
) -> OracleDenoiser:
    """The exact denoiser (on `sde`) of `toy_molecules(jr.key(seed), n_molecules, n_atoms, capacity)`. The
    defaults are the toy problem of the consistency oracle tests and experiments: 4 molecules of 7 atoms in 9
    slots, pairwise RMSDs above 1 A (so "within 0.1 A of a molecule" means "on that molecule")."""
    data, mask = toy_molecules(jr.key(seed), n_molecules, n_atoms, capacity)
    return OracleDenoiser(data, mask, sde)


def uniform_batches(oracle: OracleDenoiser, batch_size: int, *, data_seed: int) -> Callable[[int], Iterator[Batch]]:
    """start -> the host batches of steps start, start + 1, ...: `batch_size` of the oracle's molecules, drawn
    uniformly with replacement by `np.random.default_rng([data_seed, step])`."""
    rows_x, rows_h = np.asarray(oracle.data.positions), np.asarray(oracle.data.features)
    m = np.asarray(oracle.mask)

    def batches(start: int) -> Iterator[Batch]:
        for k in range(start, 2**62):
            i = np.random.default_rng([data_seed, k]).integers(0, rows_x.shape[0], batch_size)
            yield Batch(
                rows_x[i],
                rows_h[i],
                np.broadcast_to(m, (batch_size, m.shape[0])),
                np.full(batch_size, m.sum()),
                np.ones(batch_size, np.float32),
            )

    return batches


def fixed_molecules(
    n: int, n_atoms: int, sde: AbstractSDE, *, rotations: int, seed: int, batch_size: int, data_seed: int
) -> tuple[OracleDenoiser, Callable[[int], Iterator[Batch]]]:
    """(`qm9_oracle(n, n_atoms, sde, ...)`, its `uniform_batches`): an oracle teacher and the data it knows."""
    oracle = qm9_oracle(n, n_atoms, sde, rotations=rotations, seed=seed)
    return oracle, uniform_batches(oracle, batch_size, data_seed=data_seed)


def tiled_batch(data: Molecule, mask: NodeMask, batch: int) -> tuple[Molecule, BatchNodeMask, Float[Array, " batch"]]:
    """(molecules, masks, weights) of one device batch: the K molecules of `data` (a leading K axis, one mask)
    repeated in order, k = 0, 1, ..., K - 1, 0, 1, ..., up to `batch` rows; every weight 1."""
    reps = -(-batch // data.positions.shape[0])
    mols = jax.tree.map(lambda a: jnp.tile(a, (reps,) + (1,) * (a.ndim - 1))[:batch], data)
    return mols, jnp.broadcast_to(mask, (batch, mask.shape[0])), jnp.ones(batch)
