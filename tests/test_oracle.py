"""Exact denoisers: the finite-set oracle against a float64 brute force, its limits, (non-)equivariance, the
rotation-augmented oracle and the Gaussian oracle."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from sde_mol.molecule import Molecule, project, random_orthogonal, transform
from sde_mol.oracle import GaussianOracle, OracleDenoiser, landing, nearest, rotation_augmented, toy_molecules
from sde_mol.sde import DiscreteVPSDE, KarrasSDE, PolynomialVPSDE

DATA, MASK = toy_molecules(jr.key(0), 6, 7, 9)
SDES = [DiscreteVPSDE.edm_polynomial(), KarrasSDE(), PolynomialVPSDE()]


def _brute_force(data: Molecule, z: Molecule, alpha, sigma):
    """E[x0 | z] in float64 numpy, straight from Bayes' rule over the K molecules."""
    x = np.concatenate([np.asarray(data.positions), np.asarray(data.features)], -1).astype(np.float64)
    zz = np.concatenate([np.asarray(z.positions), np.asarray(z.features)], -1).astype(np.float64)
    alpha, sigma = float(alpha), float(sigma)
    logits = -(((zz[None] - alpha * x) ** 2).sum((1, 2))) / (2 * sigma**2)
    w = np.exp(logits - logits.max())
    w /= w.sum()
    return np.tensordot(w, x, axes=1), w


def test_toy_molecules():
    x = np.asarray(DATA.positions)
    assert x.shape == (6, 9, 3) and DATA.features.shape == (6, 9, 6)
    np.testing.assert_allclose(x.sum(1), 0, atol=1e-5)
    assert np.all(x[:, 7:] == 0) and np.all(np.asarray(DATA.features)[:, 7:] == 0)
    dist = np.linalg.norm(x[:, :7, None] - x[:, None, :7], axis=-1)
    off = dist[:, ~np.eye(7, dtype=bool)]
    assert off.min() >= 1.2 - 1e-4
    # every atom has a bonded neighbour (at most the bond length away)
    nearest = np.where(np.eye(7, dtype=bool), np.inf, dist).min(-1)
    assert nearest.max() <= 1.5 + 1e-4
    h = np.asarray(DATA.features)[:, :7]
    assert np.all(np.isin(h[..., :5], [0.0, 0.25])) and np.all(h[..., :5].sum(-1) == 0.25)
    z = h[..., 5] * 10
    np.testing.assert_allclose(z, np.array([1, 6, 7, 8, 9])[h[..., :5].argmax(-1)], rtol=1e-6)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_oracle_is_the_posterior_mean(sde):
    oracle = OracleDenoiser(DATA, MASK, sde)
    for frac in (0.02, 0.3, 0.6, 0.9):
        t = sde.t_min + frac * (sde.t_max - sde.t_min)
        alpha, sigma = sde.marginal(t)
        z, _ = sde.perturb(jax.tree.map(lambda a: a[1], DATA), MASK, t, key=jr.key(int(frac * 100)))
        expected, w = _brute_force(DATA, z, alpha, sigma)
        np.testing.assert_allclose(oracle(t, z, MASK).to_array(), expected, atol=2e-5)
        np.testing.assert_allclose(jnp.exp(oracle.log_weights(t, z, MASK)), w, atol=2e-5)


def test_oracle_limits():
    sde = KarrasSDE()
    oracle = OracleDenoiser(DATA, MASK, sde)
    x2 = jax.tree.map(lambda a: a[2], DATA)
    z, _ = sde.perturb(x2, MASK, 0.01, key=jr.key(1))
    np.testing.assert_allclose(oracle(0.01, z, MASK).to_array(), x2.to_array(), atol=1e-6)
    # far in the noise the posterior is nearly uniform
    z = sde.prior(MASK, 6, key=jr.key(2))
    np.testing.assert_allclose(jnp.exp(oracle.log_weights(80.0, z, MASK)), 1 / 6, rtol=0.2)


def test_plain_oracle_is_not_equivariant_but_augmented_nearly_is():
    sde = PolynomialVPSDE()
    plain = OracleDenoiser(DATA, MASK, sde)
    augmented = rotation_augmented(DATA, MASK, sde, 300, key=jr.key(3))
    assert augmented.data.positions.shape == (6 * 300, 9, 3)
    # the augmented set is made of rigid copies: same features, same distances, CoM-free
    np.testing.assert_array_equal(augmented.data.features[6 * 7 + 4], DATA.features[4])
    x = np.asarray(augmented.data.positions[6 * 7 + 4])
    d_rot = np.linalg.norm(x[:, None] - x[None], axis=-1)
    d_ref = np.linalg.norm(np.asarray(DATA.positions[4])[:, None] - np.asarray(DATA.positions[4])[None], axis=-1)
    np.testing.assert_allclose(d_rot, d_ref, atol=1e-4)

    t = 0.7
    rot = random_orthogonal(jr.key(4), reflect=False)
    errors = {}
    for name, oracle in (("plain", plain), ("augmented", augmented)):
        errs = []
        for i in range(8):
            z = sde.prior(MASK, 6, key=jr.key(10 + i))
            rz = transform(z, MASK, rot, jnp.zeros(3))
            out, out_r = oracle(t, z, MASK), oracle(t, rz, MASK)
            errs.append(float(jnp.linalg.norm(out_r.positions - out.positions @ rot.T)))
        errors[name] = np.mean(errs)
    # rotating the input does not rotate the plain oracle's estimate; the augmented one nearly follows
    assert errors["plain"] > 0.3
    assert errors["augmented"] < 0.5 * errors["plain"]


def test_gaussian_oracle():
    sde = PolynomialVPSDE()
    k1, k2 = jr.split(jr.key(5))
    mean = project(Molecule(jr.normal(k1, (9, 3)), jr.normal(k2, (9, 6))), MASK)
    oracle = GaussianOracle(mean, 0.7, sde)
    z = sde.prior(MASK, 6, key=jr.key(6))
    for t in (0.1, 0.5, 0.95):
        alpha, sigma = sde.marginal(t)
        var = (alpha * 0.7) ** 2 + sigma**2
        np.testing.assert_allclose(oracle.marginal_std(t) ** 2, var, rtol=1e-6)
        # Tweedie: the score of N(alpha mean, var I) is -(z - alpha mean) / var
        score = sde.score(oracle, t, z, MASK)
        expected = project(-(z - alpha * mean) / var, MASK)
        np.testing.assert_allclose(score.to_array(), expected.to_array(), rtol=1e-4, atol=1e-4)


def test_nearest_and_landing_score_samples_against_the_molecules():
    """Samples = molecules 2, 0, 5 shifted by 0.05 / 0.3 / 0 A (every atom along x): RMSD to the nearest is the
    shift, the index is the molecule's, and `landing` counts the samples within tol per molecule."""
    oracle = OracleDenoiser(DATA, MASK, PolynomialVPSDE())
    x = np.asarray(DATA.positions)[:, :7]
    shift = np.asarray([0.05, 0.3, 0.0], np.float32)
    samples = x[[2, 0, 5]] + shift[:, None, None] * np.asarray([1.0, 0.0, 0.0], np.float32)
    d, k = nearest(samples, oracle)
    np.testing.assert_allclose(d, shift, atol=1e-6)
    np.testing.assert_array_equal(k, [2, 0, 5])
    r = landing(samples, oracle, tol=0.1)
    np.testing.assert_allclose(r.within, 2 / 3)
    np.testing.assert_array_equal(r.hits, [0, 0, 1, 0, 0, 1])
    np.testing.assert_allclose(r.median, 0.05, atol=1e-6)
