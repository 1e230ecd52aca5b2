"""sde_mol.objectives.distribution_matching: DMD's generator gradient vanishes when the fake denoiser is the
teacher, each loss reaches only its own network, and on Gaussian data with exact denoisers DMD moves a
one-step generator onto the teacher's distribution (mean and spread)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from sde_mol.denoisers import AbstractX0Denoiser
from sde_mol.molecule import Molecule, project
from sde_mol.objectives.distribution_matching import DistributionMatching, GeneratorPair
from sde_mol.oracle import GaussianOracle
from sde_mol.sde import AbstractSDE, PolynomialVPSDE
from sde_mol.training.state import fit_tiled, trainable_filter

N, CAP, N_FEAT = 5, 6, 2
MASK = jnp.arange(CAP) < N


class _Params(eqx.Module):
    mean: Molecule
    log_scale: jax.Array


class _GaussianFamily(AbstractX0Denoiser):
    """The exact denoiser of N(mean, scale^2 I) with trainable mean and scale (`oracle.GaussianOracle`'s formula)."""

    net: _Params
    sde: AbstractSDE

    def __call__(self, t, z, mask):
        alpha, sigma = self.sde.marginal(t)
        var = jnp.exp(2.0 * self.net.log_scale)
        return project(self.net.mean + alpha * var / (alpha**2 * var + sigma**2) * (z - alpha * self.net.mean), mask)


class _AffineGenerator(AbstractX0Denoiser):
    """A one-step generator of N(mean, scale^2 I): x0 = mean + scale z / sigma(t) (z ~ the prior at t_max)."""

    net: _Params
    sde: AbstractSDE

    def __call__(self, t, z, mask):
        _, sigma = self.sde.marginal(t)
        return project(self.net.mean + jnp.exp(self.net.log_scale) * z / sigma, mask)


def _molecule(key, scale=1.0):
    kx, kh = jr.split(key)
    mol = Molecule(scale * jr.normal(kx, (CAP, 3)), scale * jr.normal(kh, (CAP, N_FEAT)))
    return project(mol, MASK)


def _params(mean, scale):
    return _Params(mean, jnp.log(jnp.asarray(scale, jnp.float32)))


def _data():
    return jax.tree.map(lambda a: a[None], _molecule(jr.key(9))), MASK  # one row: DMD only reads its mask


def test_generator_gradient_vanishes_when_fake_is_the_teacher():
    """F = D gives g = 0 exactly: no generator gradient; the fake loss still trains F (and only F)."""
    sde = PolynomialVPSDE()
    teacher = _GaussianFamily(_params(_molecule(jr.key(1), 0.5), 0.3), sde)
    pair = GeneratorPair(_AffineGenerator(_params(_molecule(jr.key(2)), 1.0), sde), teacher)
    objective = DistributionMatching(teacher, n_steps=1)
    mols, mask = _data()

    def loss(p, which):
        model = eqx.combine(p, static)
        terms = jax.vmap(lambda k: objective.loss_one(model, jax.tree.map(lambda a: a[0], mols), mask, key=k, step=0))(
            jr.split(jr.key(3), 16)
        )
        return jnp.mean(terms[1][which])

    params, static = eqx.partition(pair, trainable_filter(pair))
    g_dmd = jax.grad(loss)(params, "dmd")
    g_fake = jax.grad(loss)(params, "fake")
    norm = lambda tree: float(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))  # noqa: E731
    assert norm(g_dmd.generator) == 0.0 and norm(g_dmd.fake) == 0.0
    assert norm(g_fake.fake) > 0.0 and norm(g_fake.generator) == 0.0  # x is stopped in the fake loss
    # with another fake denoiser the generator gets a gradient, the fake loss still none
    other = GeneratorPair(pair.generator, _GaussianFamily(_params(_molecule(jr.key(4)), 0.8), sde))
    params, static = eqx.partition(other, trainable_filter(other))
    assert norm(jax.grad(loss)(params, "dmd").generator) > 0.0


@pytest.mark.parametrize("n_steps, chain_gradient", [(1, False), (2, True)])
def test_dmd_moves_a_generator_onto_the_teacher(n_steps, chain_gradient):
    """Exact denoisers of Gaussians: D of N(m, 0.3^2), G and F start at N(0, 1). DMD (reverse KL) must bring G's
    mean to m and its scale to 0.3; a sign error or a missing stop-gradient sends them elsewhere."""
    sde = PolynomialVPSDE()
    m = _molecule(jr.key(1), 0.5)
    teacher = GaussianOracle(m, 0.3, sde)
    start = _params(project(Molecule(jnp.zeros((CAP, 3)), jnp.zeros((CAP, N_FEAT))), MASK), 1.0)
    pair = GeneratorPair(_AffineGenerator(start, sde), _GaussianFamily(start, sde))
    objective = DistributionMatching(teacher, n_steps=n_steps, chain_gradient=chain_gradient)
    mols, mask = _data()
    trained = fit_tiled(objective, pair, mols, mask, steps=1500, batch=64, lr=0.01, lr_decay=10.0, key=jr.key(5))
    # the generator's samples (its parameters map onto them through the chain for k > 1)
    draw = jax.jit(jax.vmap(lambda k: objective.generator_x0(trained.generator, MASK, N_FEAT, k)))
    xs = draw(jr.split(jr.key(6), 4000))
    mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), xs)
    err0 = float(jnp.sqrt(jnp.sum(m.positions**2) + jnp.sum(m.features**2)))
    err = jax.tree.map(lambda a, b: a - b, mean, m)
    err = float(jnp.sqrt(jnp.sum(err.positions**2) + jnp.sum(err.features**2)))
    assert err < 0.05 * err0, (err, err0)
    spread = float(jnp.mean(jnp.std(xs.features[:, :N], axis=0)))  # per entry (features: no CoM constraint)
    np.testing.assert_allclose(spread, 0.3, rtol=0.15)


def test_low_noise_levels_share_and_default_draw():
    """draw_level: p = 0 is DMD's U(t_low, t_high) key for key; with p = 0.5 and t_max = 0.1 a share
    0.5 + 0.5 (0.1 - t_low) / (t_high - t_low) of the levels lies below 0.1, uniformly there; bad settings
    are refused."""
    teacher = _GaussianFamily(_params(_molecule(jr.key(1), 0.5), 0.3), PolynomialVPSDE())
    keys = jr.split(jr.key(3), 20_000)
    plain = DistributionMatching(teacher, n_steps=1, t_low=0.02, t_high=0.98)
    drawn = jax.vmap(plain.draw_level)(keys)
    expected = jax.vmap(lambda k: jr.uniform(k, (), minval=0.02, maxval=0.98))(keys)
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(expected))
    low = DistributionMatching(teacher, n_steps=1, t_low=0.01, t_high=0.98, low_noise_fraction=0.5)
    t = np.asarray(jax.vmap(low.draw_level)(keys))
    share = 0.5 + 0.5 * (0.1 - 0.01) / (0.98 - 0.01)
    assert t.min() >= 0.01 and t.max() <= 0.98
    assert abs(np.mean(t <= 0.1) - share) < 0.015  # ~4 standard errors
    below = t[t <= 0.1]
    assert abs(np.mean(below <= 0.055) - 0.5) < 0.02  # uniform on [0.01, 0.1]
    with pytest.raises(ValueError, match="low_noise_fraction"):
        DistributionMatching(teacher, n_steps=1, low_noise_fraction=1.5)
    with pytest.raises(ValueError, match="low_noise_t_max"):
        DistributionMatching(teacher, n_steps=1, t_low=0.2, low_noise_fraction=0.5, low_noise_t_max=0.1)
