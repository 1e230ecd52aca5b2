"""SDE maths: EDM schedule parity, drift coefficients, transitions, Gaussian transport by the PF-ODE and the
reverse SDE, CoM-free perturbation."""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from sde_mol.molecule import Molecule, normal_log_prob, project, state_dim
from sde_mol.oracle import GaussianOracle
from sde_mol.samplers import pf_ode_solve, reverse_sde_solve
from sde_mol.schedules import (
    edm_gamma_table,
    edm_polynomial_alphas2,
    karras_sigma_grid,
    time_grid,
    uniform_grid,
)
from sde_mol.sde import (
    VESDE,
    CosineVPSDE,
    DiscreteVPSDE,
    KarrasSDE,
    PolynomialVPSDE,
    vp_alpha_t_given_s,
    vp_sigma2_t_given_s,
)

EDM = DiscreteVPSDE.edm_polynomial()
CONTINUOUS = [PolynomialVPSDE(), CosineVPSDE(), VESDE(), KarrasSDE()]
MASK = jnp.arange(9) < 7


def _steps(t_int):
    """EDM's t = t_int / T, a correctly rounded float32 division (numpy, not XLA)."""
    return np.asarray(t_int, np.float32) / np.float32(1000)


# --- EDM parity ------------------------------------------------------------------------------------------


def test_edm_table_bit_exact(fixture_npz):
    d = fixture_npz
    np.testing.assert_array_equal(edm_polynomial_alphas2(), d["alphas2_f64"])
    table = edm_gamma_table()
    assert table.dtype == np.float32 and table.shape == (1001,)
    np.testing.assert_array_equal(table, d["gamma"])
    np.testing.assert_array_equal(table, d["param/gamma.gamma"])
    np.testing.assert_array_equal(np.asarray(EDM.gamma_table), d["gamma"])


def test_edm_schedule_lookup_parity(fixture_npz):
    d = fixture_npz
    t = jnp.asarray(d["sched_t"])
    np.testing.assert_array_equal(_steps(d["sched_t_int"]), d["sched_t"])
    # the lookup itself is EDM's, bit for bit
    np.testing.assert_array_equal(jax.vmap(EDM.lookup)(t), d["sched_gamma"])
    # gamma derived on the ABC from (alpha, sigma) is within one float32 ulp of the table
    np.testing.assert_allclose(jax.vmap(EDM.gamma)(t), d["sched_gamma"], rtol=0, atol=1e-6)
    alpha, sigma = jax.vmap(EDM.marginal)(t)
    np.testing.assert_allclose(alpha, d["sched_alpha"], rtol=2e-7)
    np.testing.assert_allclose(sigma, d["sched_sigma"], rtol=2e-7)
    np.testing.assert_allclose((alpha / sigma) ** 2, d["sched_snr"], rtol=3e-7)
    np.testing.assert_allclose(jnp.exp(jax.vmap(EDM.logsnr)(t)), d["sched_snr"], rtol=2e-6)


def test_edm_pair_parity(fixture_npz):
    d = fixture_npz
    s, t = _steps(d["sched_pair_s_int"]), _steps(d["sched_pair_t_int"])
    gamma_s, gamma_t = jax.vmap(EDM.lookup)(s), jax.vmap(EDM.lookup)(t)
    sigma2 = vp_sigma2_t_given_s(gamma_s, gamma_t)
    np.testing.assert_allclose(sigma2, d["sched_pair_sigma2_t_given_s"], rtol=1e-6)
    np.testing.assert_allclose(jnp.sqrt(sigma2), d["sched_pair_sigma_t_given_s"], rtol=1e-6)
    np.testing.assert_allclose(vp_alpha_t_given_s(gamma_s, gamma_t), d["sched_pair_alpha_t_given_s"], rtol=1e-7)
    # the generic transition (from alpha, sigma; used by every sampler) agrees to float32 round-off: its
    # sigma^2_{t|s} is a difference of two numbers near 1 when t is near 1
    alpha_ts, sigma2_ts = jax.vmap(EDM.transition)(s, t)
    np.testing.assert_allclose(alpha_ts, d["sched_pair_alpha_t_given_s"], rtol=1e-6)
    np.testing.assert_allclose(sigma2_ts, d["sched_pair_sigma2_t_given_s"], rtol=5e-5)


def test_polynomial_vp_is_the_continuous_edm_schedule():
    t = jnp.arange(1000) / 1000.0  # the table's last entry carries EDM's step-ratio clip
    np.testing.assert_allclose(jax.vmap(PolynomialVPSDE().gamma)(t), EDM.gamma_table[:1000], atol=1e-4)


# --- grids -----------------------------------------------------------------------------------------------


def test_grids():
    # uniform on [0, 1] reproduces EDM's t_int / T bit for bit
    np.testing.assert_array_equal(uniform_grid(0.0, 1.0, 1000), _steps(np.arange(1001)))
    ts = time_grid(EDM, 1000)
    np.testing.assert_array_equal(ts, _steps(np.arange(1000, -1, -1)))
    karras = KarrasSDE()
    sigmas = karras_sigma_grid(0.002, 80.0, 18, rho=7.0)
    assert float(sigmas[0]) == 80.0 and float(sigmas[-1]) == np.float32(0.002)
    np.testing.assert_allclose(time_grid(karras, 18, "karras"), sigmas, rtol=1e-5)
    for sde in [*CONTINUOUS, EDM]:
        for spacing in ("uniform", "karras"):
            grid = np.asarray(eqx.filter_jit(time_grid)(sde, 40, spacing))
            assert grid[0] == np.float32(sde.t_max) and grid[-1] == np.float32(sde.t_min)
            assert np.all(np.diff(grid) <= 0)
    # karras spacing in a VP process: rho-spaced in sigma / alpha
    vp = PolynomialVPSDE()
    scaled = jax.vmap(vp.scaled_sigma)(time_grid(vp, 30, "karras"))
    expected = karras_sigma_grid(float(scaled[-1]), float(scaled[0]), 30)
    np.testing.assert_allclose(scaled, expected, rtol=2e-3)


@pytest.mark.parametrize("sde", CONTINUOUS, ids=lambda s: type(s).__name__)
def test_t_from_logsnr_inverts(sde):
    t = jnp.linspace(sde.t_min, sde.t_max, 13)[1:-1]
    back = sde.t_from_logsnr(jax.vmap(sde.logsnr)(t))
    np.testing.assert_allclose(back, t, rtol=1e-4, atol=1e-6)


# --- drift coefficients: jvp of the marginal vs closed forms ---------------------------------------------


def _closed_form(sde, t):
    """(f, g^2) written out by hand for each process."""
    if isinstance(sde, PolynomialVPSDE):
        s, p = sde.precision, sde.power
        alpha2 = (1 - 2 * s) * (1 - t**p) ** 2 + s
        d_alpha2 = (1 - 2 * s) * 2 * (1 - t**p) * (-p * t ** (p - 1))
        return 0.5 * d_alpha2 / alpha2, -d_alpha2 / alpha2  # VP: g^2 = -(alpha^2)' / alpha^2
    if isinstance(sde, CosineVPSDE):
        phi = (t + sde.s) / (1 + sde.s) * math.pi / 2
        f = -math.tan(phi) * math.pi / (2 * (1 + sde.s))
        return f, -2 * f
    if isinstance(sde, VESDE):
        sigma = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
        return 0.0, 2 * sigma**2 * math.log(sde.sigma_max / sde.sigma_min)
    if isinstance(sde, KarrasSDE):
        return 0.0, 2 * t
    raise TypeError(sde)


@pytest.mark.parametrize("sde", CONTINUOUS, ids=lambda s: type(s).__name__)
def test_drift_coeffs_match_closed_forms(sde):
    for frac in (0.03, 0.2, 0.5, 0.8, 0.97):
        t = sde.t_min + frac * (sde.t_max - sde.t_min)
        f, g2 = sde.drift_coeffs(t)
        f_ref, g2_ref = _closed_form(sde, t)
        np.testing.assert_allclose(f, f_ref, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(g2, g2_ref, rtol=2e-4, atol=1e-6)


def test_discrete_drift_coeffs_from_interpolated_table():
    table = np.asarray(EDM.gamma_table, np.float64)
    for i in (0, 7, 500, 931, 999):
        t = (i + 0.3) / 1000
        gamma = table[round(t * 1000)]
        d_gamma = (table[i + 1] - table[i]) * 1000
        sigma2 = 1 / (1 + np.exp(-gamma))
        f, g2 = EDM.drift_coeffs(t)
        # f = alpha'/alpha loses digits near t = 0 (d sigmoid = s(1 - s) with s ~ 1): absolute 1e-5
        np.testing.assert_allclose(f, -0.5 * sigma2 * d_gamma, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g2, sigma2 * d_gamma, rtol=1e-4)


def test_vp_helpers_agree_with_generic_transition():
    vp = PolynomialVPSDE()
    for s, t in [(0.1, 0.2), (0.4, 0.41), (0.6, 0.9)]:
        alpha_ts, sigma2_ts = vp.transition(s, t)
        np.testing.assert_allclose(vp_alpha_t_given_s(vp.gamma(s), vp.gamma(t)), alpha_ts, rtol=1e-5)
        np.testing.assert_allclose(vp_sigma2_t_given_s(vp.gamma(s), vp.gamma(t)), sigma2_ts, rtol=1e-4)


# --- perturbation and prior ------------------------------------------------------------------------------


def _random_state(key, n_feat=6, scale=1.0):
    k1, k2 = jr.split(key)
    mol = Molecule(scale * jr.normal(k1, (9, 3)), scale * jr.normal(k2, (9, n_feat)))
    return project(mol, MASK)


def test_perturb_is_com_free_and_consistent():
    x0 = _random_state(jr.key(0))
    keys = jr.split(jr.key(1), 4000)
    z, eps = jax.jit(jax.vmap(lambda k: EDM.perturb(x0, MASK, 0.5, key=k)))(keys)
    alpha, sigma = EDM.marginal(0.5)
    np.testing.assert_allclose(z.positions, alpha * x0.positions + sigma * eps.positions, atol=1e-6)
    com = jnp.sum(z.positions * MASK[:, None], axis=-2)
    assert float(jnp.max(jnp.abs(com))) < 1e-5
    assert float(jnp.max(jnp.abs(z.positions[:, 7:]))) == 0.0 and float(jnp.max(jnp.abs(z.features[:, 7:]))) == 0.0
    # eps is standard normal on the (M-1)*3 + M*n_feat dimensional state space
    sq = jnp.sum(eps.positions**2, axis=(1, 2)) + jnp.sum(eps.features**2, axis=(1, 2))
    dim = float(state_dim(MASK, 6))
    assert abs(float(jnp.mean(sq)) - dim) < 4 * math.sqrt(2 * dim / 4000)


@pytest.mark.parametrize("sde", [EDM, KarrasSDE()], ids=["edm", "karras"])
def test_prior(sde):
    z = jax.jit(jax.vmap(lambda k: sde.prior(MASK, 6, key=k)))(jr.split(jr.key(2), 2000))
    _, sigma = sde.marginal(sde.t_max)
    dim = float(state_dim(MASK, 6))
    sq = jnp.sum(z.positions**2, axis=(1, 2)) + jnp.sum(z.features**2, axis=(1, 2))
    assert abs(float(jnp.mean(sq)) / (dim * sigma**2) - 1) < 0.03
    assert float(jnp.max(jnp.abs(jnp.sum(z.positions, axis=-2)))) < 1e-3 * float(sigma)
    one = jax.tree.map(lambda a: a[0], z)
    np.testing.assert_allclose(sde.prior_log_prob(one, MASK), normal_log_prob(one, MASK, sigma), rtol=1e-6)


# --- transport of a Gaussian data distribution -----------------------------------------------------------


def _gaussian_setup(sde):
    mean = _random_state(jr.key(5), scale=0.8)
    return GaussianOracle(mean, 0.6, sde), mean


def _interval(sde):
    return sde.t_min + 0.8 * (sde.t_max - sde.t_min), sde.t_min + 0.05 * (sde.t_max - sde.t_min)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "sde",
    [
        pytest.param(PolynomialVPSDE(), id="vp"),
        pytest.param(KarrasSDE(), id="karras"),
        pytest.param(CosineVPSDE(), id="cosine", marks=SLOW),
        pytest.param(VESDE(), id="ve", marks=SLOW),
    ],
)
def test_pf_ode_transports_gaussian_marginal(sde):
    """For x0 ~ N(mu, s^2 I) the PF-ODE maps z_t to z_s = alpha_s mu + (std_s / std_t)(z_t - alpha_t mu):
    checked sample by sample, and through the sample mean and variance."""
    oracle, mean = _gaussian_setup(sde)
    t, s = _interval(sde)
    alpha_t, _ = sde.marginal(t)
    alpha_s, _ = sde.marginal(s)
    std_t, std_s = oracle.marginal_std(t), oracle.marginal_std(s)
    n = 500

    def one(key):
        z_t = project(alpha_t * mean + std_t * _random_state(key), MASK)
        ts = jnp.linspace(jnp.float32(t), jnp.float32(s), 11)
        z_s, _ = pf_ode_solve(oracle, sde, z_t, MASK, ts, solver=dfx.Dopri5(), adaptive=True, rtol=1e-6, atol=1e-6)
        return z_t, z_s

    z_t, z_s = jax.jit(jax.vmap(one))(jr.split(jr.key(6), n))
    exact = jax.vmap(lambda z: alpha_s * mean + (std_s / std_t) * (z - alpha_t * mean))(z_t)
    scale = float(std_s)
    np.testing.assert_allclose(z_s.positions, exact.positions, atol=2e-4 * scale + 1e-5)
    np.testing.assert_allclose(z_s.features, exact.features, atol=2e-4 * scale + 1e-5)
    dev = jax.vmap(lambda z: z - alpha_s * mean)(z_s)
    dim = float(state_dim(MASK, 6))
    sq = jnp.sum(dev.positions**2, axis=(1, 2)) + jnp.sum(dev.features**2, axis=(1, 2))
    assert abs(float(jnp.mean(sq)) / (dim * std_s**2) - 1) < 5 * math.sqrt(2 / (dim * n))
    assert float(jnp.max(jnp.abs(jnp.mean(dev.features[:, :7], axis=0)))) < 5 * scale / math.sqrt(n)


@pytest.mark.parametrize(
    "sde", [pytest.param(PolynomialVPSDE(), id="vp"), pytest.param(KarrasSDE(), id="karras", marks=SLOW)]
)
def test_reverse_sde_transports_gaussian_marginal(sde):
    oracle, mean = _gaussian_setup(sde)
    t, s = _interval(sde)
    alpha_t, _ = sde.marginal(t)
    alpha_s, _ = sde.marginal(s)
    std_t, std_s = oracle.marginal_std(t), oracle.marginal_std(s)
    n = 2000

    def one(key):
        k0, k1 = jr.split(key)
        z_t = project(alpha_t * mean + std_t * _random_state(k0), MASK)
        ts = jnp.geomspace(jnp.float32(t), jnp.float32(s), 201)  # Euler-Maruyama error ~ dt / t
        return reverse_sde_solve(oracle, sde, z_t, MASK, ts, key=k1)

    z_s = jax.jit(jax.vmap(one))(jr.split(jr.key(7), n))
    dev = jax.vmap(lambda z: z - alpha_s * mean)(z_s)
    dim = float(state_dim(MASK, 6))
    sq = jnp.sum(dev.positions**2, axis=(1, 2)) + jnp.sum(dev.features**2, axis=(1, 2))
    # Monte Carlo (5 sigma) plus a few percent of Euler-Maruyama bias
    assert abs(float(jnp.mean(sq)) / (dim * std_s**2) - 1) < 5 * math.sqrt(2 / (dim * n)) + 0.03
    assert float(jnp.max(jnp.abs(jnp.mean(dev.features[:, :7], axis=0)))) < 5 * float(std_s) / math.sqrt(n)
    com = jnp.max(jnp.abs(jnp.sum(z_s.positions, axis=-2)))
    assert float(com) < 1e-5 * float(jnp.max(jnp.abs(z_s.positions)))  # CoM-free up to float32 round-off
