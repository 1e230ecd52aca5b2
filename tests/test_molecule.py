import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from sde_mol.molecule import (
    Molecule,
    com_dof,
    com_free_normal,
    com_free_normal_log_prob,
    node_mask_from_counts,
    normal_log_prob,
    pad_numpy,
    project,
    random_orthogonal,
    remove_com,
    transform,
)


def _mask(m, n=29):
    return jnp.arange(n) < m


def test_remove_com_zero_mean_and_padding():
    key = jr.PRNGKey(0)
    x = jr.normal(key, (29, 3)) + 5.0
    mask = _mask(11)
    y = remove_com(x, mask)
    np.testing.assert_allclose(np.asarray(y[:11].sum(0)), 0.0, atol=1e-5)
    assert np.all(np.asarray(y[11:]) == 0.0)
    # idempotent, and only a translation of the real atoms
    np.testing.assert_allclose(np.asarray(remove_com(y, mask)), np.asarray(y), atol=1e-6)
    d = np.asarray(x[:11] - y[:11])
    np.testing.assert_allclose(d - d[0], 0.0, atol=1e-5)


def test_com_free_normal_statistics():
    mask = _mask(7, 12)
    keys = jr.split(jr.PRNGKey(1), 20000)
    z = jax.vmap(lambda k: com_free_normal(k, mask, 6))(keys)
    x = np.asarray(z.positions)
    np.testing.assert_allclose(x[:, :7].sum(1), 0.0, atol=1e-4)
    assert np.all(x[:, 7:] == 0) and np.all(np.asarray(z.features)[:, 7:] == 0)
    # E||x||^2 = (M-1)*3 for the standard Gaussian on the (M-1)*3-dim subspace
    np.testing.assert_allclose((x**2).sum((1, 2)).mean(), 18.0, rtol=0.02)
    np.testing.assert_allclose((np.asarray(z.features) ** 2).sum((1, 2)).mean(), 42.0, rtol=0.02)
    # per-coordinate variance of a real atom is (M-1)/M
    np.testing.assert_allclose(x[:, 0, 0].var(), 6 / 7, rtol=0.05)


def test_com_free_log_prob_matches_subspace_gaussian():
    """Compare with the density of an explicit orthonormal basis of the CoM-free subspace."""
    m, n = 5, 8
    mask = _mask(m, n)
    key = jr.PRNGKey(2)
    x = remove_com(jr.normal(key, (n, 3)), mask)
    scale = 0.7
    # orthonormal basis of {v in R^m: sum v = 0}
    a = np.eye(m) - 1.0 / m
    u, s, _ = np.linalg.svd(a)
    basis = u[:, : m - 1]  # (m, m-1)
    coords = basis.T @ np.asarray(x[:m], dtype=np.float64)  # (m-1, 3)
    dof = 3 * (m - 1)
    expected = -0.5 * (coords**2).sum() / scale**2 - dof * (0.5 * np.log(2 * np.pi) + np.log(scale))
    got = float(com_free_normal_log_prob(x, mask, scale))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(com_dof(mask)) == dof


def test_normal_log_prob_counts_feature_dims():
    mask = _mask(4, 6)
    mol = project(Molecule(jnp.ones((6, 3)), jnp.ones((6, 2))), mask)
    lp = float(normal_log_prob(mol, mask))
    dims = 3 * 3 + 4 * 2
    expected = -0.5 * 8.0 - 0.5 * dims * np.log(2 * np.pi)  # positions project to 0; features 8 ones
    np.testing.assert_allclose(lp, expected, rtol=1e-6)


def test_random_orthogonal_and_transform():
    for i in range(20):
        r = random_orthogonal(jr.PRNGKey(i), reflect=True)
        np.testing.assert_allclose(np.asarray(r @ r.T), np.eye(3), atol=1e-5)
    dets = [float(jnp.linalg.det(random_orthogonal(jr.PRNGKey(i), reflect=True))) for i in range(40)]
    assert any(d < 0 for d in dets) and any(d > 0 for d in dets)
    assert all(float(jnp.linalg.det(random_orthogonal(jr.PRNGKey(i), reflect=False))) > 0 for i in range(10))
    mask = _mask(3, 5)
    mol = project(Molecule(jr.normal(jr.PRNGKey(3), (5, 3)), jnp.ones((5, 2))), mask)
    r = random_orthogonal(jr.PRNGKey(4))
    out = transform(mol, mask, r, jnp.array([1.0, 2.0, 3.0]))
    assert np.all(np.asarray(out.positions[3:]) == 0)
    np.testing.assert_allclose(np.asarray(out.positions[:3].mean(0)), [1.0, 2.0, 3.0], atol=1e-5)


def test_molecule_arithmetic_and_arrays():
    a = Molecule(jnp.ones((4, 3)), jnp.full((4, 2), 2.0))
    b = 0.5 * a - a / 4 + (-a)
    np.testing.assert_allclose(np.asarray(b.features), -1.5)
    xh = a.to_array()
    assert xh.shape == (4, 5)
    c = Molecule.from_array(xh)
    assert c.n_atoms == 4 and c.n_feat == 2


def test_masks_and_padding():
    m = node_mask_from_counts(jnp.array([2, 3]), 4)
    assert m.tolist() == [[True, True, False, False], [True, True, True, False]]
    p = pad_numpy(np.ones((3, 3)), 5)
    assert p.shape == (5, 3) and p[3:].sum() == 0
    with pytest.raises(ValueError, match="capacity"):
        pad_numpy(np.ones((6, 3)), 5)
