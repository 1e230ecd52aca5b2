"""sde_mol/data/fixed.py: the fixed-molecule data sets (QM9's first n of one size, toy molecules), their exact
oracle and batches: rotations as asked, batches resumable at any step and drawn from the oracle's molecules, a
clear error when QM9 has too few molecules of the size."""

from itertools import islice

import jax.numpy as jnp
import numpy as np
import pytest

from sde_mol.data.fixed import qm9_oracle, tiled_batch, toy_oracle, uniform_batches
from sde_mol.sde import PolynomialVPSDE

SDE = PolynomialVPSDE()


def _distances(positions):
    """Pairwise distances of each molecule's 9 atoms: what a rotation keeps."""
    p = np.asarray(positions)[:, :9]
    return np.linalg.norm(p[:, :, None] - p[:, None, :], axis=-1)


def test_qm9_oracle_and_its_uniform_batches():
    plain = qm9_oracle(3, 9, SDE, rotations=1, seed=0)
    rotated = qm9_oracle(3, 9, SDE, rotations=2, seed=0)
    assert plain.data.positions.shape[0] == 3 and rotated.data.positions.shape[0] == 6
    assert int(plain.mask.sum()) == 9 and bool(jnp.all(rotated.mask == plain.mask))
    np.testing.assert_allclose(_distances(rotated.data.positions[3:]), _distances(plain.data.positions), atol=1e-4)
    batches = uniform_batches(rotated, 5, data_seed=1)
    run, resumed = list(islice(batches(0), 4)), list(islice(batches(2), 2))
    for a, b in zip(run[2:], resumed, strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)
    rows = np.asarray(rotated.data.positions)
    for batch in run:
        assert batch.positions.shape == (5, *rows.shape[1:]) and np.all(batch.n_atoms == 9)
        assert all(any(np.array_equal(x, r) for r in rows) for x in batch.positions)
    with pytest.raises(ValueError, match="has only 1 molecules of 3 atoms"):
        qm9_oracle(50, 3, SDE, rotations=1, seed=0)


def test_tiled_batch_repeats_the_molecules_in_order():
    oracle = toy_oracle(SDE, n_molecules=3)
    mols, masks, weights = tiled_batch(oracle.data, oracle.mask, 7)
    np.testing.assert_array_equal(mols.positions, np.asarray(oracle.data.positions)[[0, 1, 2, 0, 1, 2, 0]])
    assert masks.shape == (7, 9) and bool(jnp.all(masks == oracle.mask)) and np.all(np.asarray(weights) == 1.0)
