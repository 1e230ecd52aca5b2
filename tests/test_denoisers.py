"""Denoisers: parametrisation conversions, EDM's eps wrapper, Karras preconditioning for any SDE, autoguidance."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jaxtyping import Array, Float

from sde_mol.denoisers import (
    AbstractDenoiser,
    EpsDenoiser,
    GuidedDenoiser,
    KarrasDenoiser,
    eps_to_x0,
    karras_preconditioning,
    v_to_x0,
    x0_to_eps,
    x0_to_score,
    x0_to_v,
)
from sde_mol.molecule import Molecule, project
from sde_mol.sde import VESDE, DiscreteVPSDE, KarrasSDE, PolynomialVPSDE

MASK = jnp.arange(8) < 6
N_FEAT = 6


class TinyNet(eqx.Module):
    """A stand-in for the EGNN with its call signature: (x, h, mask, t) -> (dx, h_out)."""

    w: Float[Array, "7 6"]
    v: Float[Array, " 7"]

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.w = jr.normal(k1, (N_FEAT + 1, N_FEAT)) / 3
        self.v = jr.normal(k2, (N_FEAT + 1,)) / 3

    def __call__(self, x, h, mask, t):
        ht = jnp.concatenate([h, jnp.full((h.shape[0], 1), t)], axis=-1)
        h_out = jnp.tanh(ht @ self.w) * mask[:, None]
        dx = x * jnp.tanh(ht @ self.v)[:, None] + 0.1  # deliberately not CoM-free: the wrapper projects
        return dx, h_out


class TimeEcho(eqx.Module):
    """Returns the time it was given in every feature slot (to see what the wrapper feeds the network)."""

    def __call__(self, x, h, mask, t):
        return jnp.zeros_like(x), jnp.full_like(h, t)


def _state(key, scale=1.0):
    k1, k2 = jr.split(key)
    return project(Molecule(scale * jr.normal(k1, (8, 3)), scale * jr.normal(k2, (8, N_FEAT))), MASK)


def _close(a: Molecule, b: Molecule, atol):
    np.testing.assert_allclose(a.positions, b.positions, atol=atol)
    np.testing.assert_allclose(a.features, b.features, atol=atol)


def test_conversion_round_trips():
    x0, eps = _state(jr.key(0)), _state(jr.key(1))
    for alpha, sigma in [(0.99, 0.14), (0.6, 0.8), (1.0, 3.0)]:
        z = alpha * x0 + sigma * eps
        _close(x0_to_eps(x0, z, alpha, sigma), eps, 1e-5)
        _close(eps_to_x0(eps, z, alpha, sigma), x0, 1e-5)
        _close(x0_to_score(x0, z, alpha, sigma), -eps / sigma, 1e-5)
        v = x0_to_v(x0, z, alpha, sigma)
        _close(v, alpha * eps - sigma * x0, 1e-5)
        _close(v_to_x0(v, z, alpha, sigma), x0, 1e-5)


def test_eps_denoiser_is_edm_parametrisation():
    sde = DiscreteVPSDE.edm_polynomial()
    net = TinyNet(jr.key(2))
    den = EpsDenoiser(net, sde)
    z, t = _state(jr.key(3)), 0.437
    # eps is the network output on (z, raw t), projected onto the state space
    dx, h = net(z.positions, z.features, MASK, jnp.float32(t))
    _close(den.eps(t, z, MASK), project(Molecule(dx, h), MASK), 1e-6)
    # the network sees the raw time t (EDM: t_int / T)
    echo = EpsDenoiser(TimeEcho(), sde).eps(t, z, MASK)
    np.testing.assert_array_equal(echo.features[:6], np.float32(t))
    # x0 = (z - sigma eps) / alpha, and eps is consistent with x0
    alpha, sigma = sde.marginal(t)
    x0 = den(t, z, MASK)
    _close(x0, (z - sigma * den.eps(t, z, MASK)) / alpha, 1e-6)
    _close(x0_to_eps(x0, z, alpha, sigma), den.eps(t, z, MASK), 1e-5)


def test_eps_denoiser_matches_edm_fixture_step_inputs(fixture_npz):
    """With a network that returns EDM's eps_hat, the wrapper's eps and x0 match the fixture's decode mean."""
    d = fixture_npz
    sde = DiscreteVPSDE.edm_polynomial()
    for b in range(3):
        mask = jnp.asarray(d["node_mask"][b, :, 0] > 0)
        z0 = Molecule.from_array(jnp.asarray(d["dec_z0"][b]))
        eps_hat = Molecule.from_array(jnp.asarray(d["dec_eps_hat"][b]))
        net = eqx.Partial(lambda x, h, m, t, e: (e.positions, e.features), e=eps_hat)
        den = EpsDenoiser(net, sde)
        _close(den.eps(0.0, z0, mask), eps_hat, 1e-6)
        x_hat = den(0.0, z0, mask)
        np.testing.assert_allclose(x_hat.to_array(), d["dec_mu"][b], atol=4e-6)


def test_karras_preconditioning_values():
    c_skip, c_out, c_in, c_noise = karras_preconditioning(1.0, 0.5)
    np.testing.assert_allclose(
        [c_skip, c_out, c_in, c_noise], [0.2, 0.5 / np.sqrt(1.25), 1 / np.sqrt(1.25), 0.0], rtol=1e-6
    )
    c_skip, c_out, c_in, c_noise = karras_preconditioning(80.0, 0.5)
    np.testing.assert_allclose(c_skip, 0.25 / (6400.25), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(80.0) / 4, rtol=1e-6)
    # boundary: D -> identity as sigma -> 0
    c_skip, c_out, _, _ = karras_preconditioning(1e-4, 0.5)
    assert abs(float(c_skip) - 1) < 1e-7 and float(c_out) < 1.1e-4
    # unit variance of the training target and of the network input (Karras' derivation)
    for s in (0.01, 0.3, 2.0, 50.0):
        c_skip, c_out, c_in, _ = karras_preconditioning(s, 0.5)
        np.testing.assert_allclose(c_in**2 * (0.25 + s**2), 1.0, rtol=1e-5)
        np.testing.assert_allclose(((1 - c_skip) ** 2 * 0.25 + c_skip**2 * s**2) / c_out**2, 1.0, rtol=1e-5)


def test_karras_denoiser_on_karras_sde():
    sde = KarrasSDE()
    net = TinyNet(jr.key(4))
    den = KarrasDenoiser(net, sde, sigma_data=0.5)
    z, sigma = _state(jr.key(5), 2.0), 2.0
    c_skip, c_out, c_in, c_noise = karras_preconditioning(sigma, 0.5)
    dx, h = net(c_in * z.positions, c_in * z.features, MASK, c_noise)
    expected = c_skip * z + c_out * project(Molecule(dx, h), MASK)
    _close(den(sigma, z, MASK), expected, 1e-5)
    # eps derived on the ABC
    _close(den.eps(sigma, z, MASK), (z - den(sigma, z, MASK)) / sigma, 1e-5)


@pytest.mark.parametrize("sde", [PolynomialVPSDE(), VESDE(0.01, 50.0)], ids=["vp", "ve"])
def test_karras_denoiser_generalises_through_scaled_sigma(sde):
    """D_sde(t, z) = D_karras(sigma / alpha, z / alpha): Karras' preconditioning seen through the VE-equivalent
    state z / alpha = x0 + (sigma / alpha) eps."""
    net = TinyNet(jr.key(6))
    z = _state(jr.key(7))
    for t in (0.05, 0.5, 0.9):
        alpha, sigma = sde.marginal(t)
        a = KarrasDenoiser(net, sde, sigma_data=0.5)(t, z, MASK)
        b = KarrasDenoiser(net, KarrasSDE(), sigma_data=0.5)(sigma / alpha, z / alpha, MASK)
        _close(a, b, 2e-5 * max(1.0, float(1 / alpha)))


def test_denoisers_are_equinox_modules_with_sde():
    sde = PolynomialVPSDE()
    for den in (EpsDenoiser(TinyNet(jr.key(8)), sde), KarrasDenoiser(TinyNet(jr.key(9)), sde)):
        assert isinstance(den, AbstractDenoiser) and den.sde is sde
        out = jax.jit(lambda d, z: d(0.3, z, MASK))(den, _state(jr.key(10)))
        assert float(jnp.max(jnp.abs(jnp.sum(out.positions, axis=0)))) < 1e-5
        assert float(jnp.max(jnp.abs(out.positions[6:]))) == 0.0


class NaNNet(eqx.Module):
    """A network whose every output is NaN: evaluating it anywhere poisons the result."""

    def __call__(self, x, h, mask, t):
        return jnp.full_like(x, jnp.nan), jnp.full_like(h, jnp.nan)


def test_guided_denoiser_extrapolates_away_from_the_guide():
    """D_w = D_bad + w (D_good - D_bad) for eps and x0 alike (under jit and vmap over molecules); w = 1 is the
    good denoiser, w = 0 the guide; a Karras-preconditioned guide mixes with an eps model through eps."""
    sde = DiscreteVPSDE.edm_polynomial()
    good, bad = EpsDenoiser(TinyNet(jr.key(20)), sde), KarrasDenoiser(TinyNet(jr.key(21)), sde)
    z, t = _state(jr.key(22)), 0.37
    alpha, sigma = sde.marginal(t)
    e_good, e_bad = good.eps(t, z, MASK), bad.eps(t, z, MASK)
    assert float(jnp.max(jnp.abs(e_good.positions - e_bad.positions))) > 0.1  # the two differ: a real test
    for w in (0.0, 1.0, 2.5):
        guided = GuidedDenoiser(good, bad, w)
        want = e_bad + w * (e_good - e_bad)
        _close(guided.eps(t, z, MASK), want, 1e-5)
        _close(guided(t, z, MASK), eps_to_x0(want, z, alpha, sigma), 1e-4)
        _close(guided(t, z, MASK), bad(t, z, MASK) + w * (good(t, z, MASK) - bad(t, z, MASK)), 1e-4)
    guided = GuidedDenoiser(good, bad, 2.5)
    _close(guided.eps(t, z, MASK), e_good + 1.5 * (e_good - e_bad), 1e-5)
    zs = jax.tree.map(lambda *a: jnp.stack(a), z, _state(jr.key(23)))
    batched = jax.jit(jax.vmap(lambda zz: guided.eps(t, zz, MASK)))(zs)
    _close(jax.tree.map(lambda a: a[0], batched), guided.eps(t, z, MASK), 1e-5)
    assert guided.sde is sde and isinstance(guided, AbstractDenoiser)


def test_guided_denoiser_evaluates_the_guide_only_inside_its_interval():
    """Outside [t_low, t_high] the result is the good denoiser's and the guide is never run (a NaN guide leaves
    no trace); inside, the guide's NaN reaches the result. Bad settings are refused."""
    sde = PolynomialVPSDE()
    good = EpsDenoiser(TinyNet(jr.key(24)), sde)
    guided = GuidedDenoiser(good, EpsDenoiser(NaNNet(), sde), 2.0, t_low=0.2, t_high=0.6)
    z = _state(jr.key(25))
    step = jax.jit(lambda d, t: d.eps(t, z, MASK))
    for t in (0.05, 0.8):
        _close(step(guided, t), good.eps(t, z, MASK), 1e-6)
    for t in (0.2, 0.4, 0.6):
        assert bool(jnp.all(jnp.isnan(step(guided, t).positions[:6])))
    with pytest.raises(ValueError, match="t_low <= t_high"):
        GuidedDenoiser(good, good, 2.0, t_low=0.7, t_high=0.6)
    with pytest.raises(ValueError, match="finite"):
        GuidedDenoiser(good, good, float("nan"))
