"""The library's promise: a new SDE is one small class (only `marginal`), and every sampler works with it."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from sde_mol.oracle import OracleDenoiser, toy_molecules
from sde_mol.samplers import ddim_sample, pf_ode_sample
from sde_mol.sde import AbstractSDE


class GaussianDecayVPSDE(AbstractSDE):
    """The README's example: alpha(t) = exp(-2 t^2), sigma = sqrt(1 - alpha^2)."""

    t_min: float = 1e-3
    t_max: float = 1.0

    def marginal(self, t):
        alpha = jnp.exp(-2.0 * t**2)
        return alpha, jnp.sqrt(1.0 - alpha**2)


def test_drift_coefficients_from_the_marginal():
    sde = GaussianDecayVPSDE()
    t = jnp.asarray(0.4)
    f, g2 = sde.drift_coeffs(t)
    # f = d log alpha / dt = -4 t; VP: g^2 = -2 f (alpha^2 + sigma^2 = 1)
    np.testing.assert_allclose(f, -1.6, rtol=1e-5)
    np.testing.assert_allclose(g2, 3.2, rtol=1e-4)


def test_samplers_land_on_the_oracle_molecules():
    sde = GaussianDecayVPSDE()
    data, mask = toy_molecules(jr.PRNGKey(0), 4, 6, 8)
    oracle = OracleDenoiser(data, mask, sde)
    keys = jr.split(jr.PRNGKey(1), 64)

    def nearest_rmsd(x):
        d = jnp.sqrt(jnp.sum((x.positions[None] - data.positions) ** 2, axis=(-1, -2)) / 6)
        return jnp.min(d)

    for sampler in (
        lambda k: pf_ode_sample(oracle, sde, mask, 6, key=k, solver="heun", n_steps=60)[0],
        lambda k: ddim_sample(oracle, sde, mask, 6, key=k, n_steps=60)[0],
    ):
        out = jax.vmap(sampler)(keys)
        rmsd = jax.vmap(nearest_rmsd)(out)
        assert float(jnp.mean(rmsd < 0.05)) >= 0.98
