"""sde_mol.likelihood: EDM's variational bound term by term against the reference fixture, and the exact PF-ODE
likelihood against the closed-form log-density of Gaussian data (where every marginal is Gaussian)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from sde_mol.data.qm9 import DatasetInfo
from sde_mol.likelihood import log_p_features_given_z0, log_p_xh_given_z0, pf_ode_log_prob, vlb_nll, vlb_terms
from sde_mol.molecule import Molecule, com_free_normal, normal_log_prob, project
from sde_mol.oracle import GaussianOracle
from sde_mol.sde import VESDE, DiscreteVPSDE, KarrasSDE, PolynomialVPSDE


@pytest.fixture(scope="module")
def fixture_parts(fixture_reference):
    return fixture_reference


def _mols(fx, key):
    a = jnp.asarray(fx[key], jnp.float32)
    return Molecule(a[..., :3], a[..., 3:])


def _close(ours, ref, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(ref, np.float64), rtol=rtol, atol=atol)


def test_vlb_terms_match_the_reference_term_by_term(fixture_npz, fixture_parts):
    den, info, mask = fixture_parts
    fx = fixture_npz
    with jax.default_matmul_precision("highest"):
        terms = jax.vmap(lambda x, m, t, e, e0: vlb_terms(den, x, m, info, t, e, e0))(
            _mols(fx, "xh_norm"), mask, jnp.asarray(fx["nll_t_int"]), _mols(fx, "nll_eps"), _mols(fx, "nll_eps0")
        )
    _close(terms["error"], fx["nll_error"])
    _close(terms["snr_weight"], fx["nll_snr_weight"])
    _close(terms["loss_t"], fx["nll_loss_t"])
    _close(1000 * terms["loss_t"], fx["nll_estimator_loss_terms"])
    _close(terms["kl_prior"], fx["nll_kl_prior"], rtol=0, atol=2e-6)  # a float32 cancellation of size ~1e-4
    _close(terms["neg_log_constants"], fx["nll_neg_log_constants"])
    _close(terms["loss_term_0"], fx["nll_loss_term_0"])
    _close(terms["neg_log_pxh"], fx["nll_neg_log_pxh"])
    _close(terms["neg_log_pn"], fx["nll_neg_log_pN"])
    _close(terms["nll"], fx["nll_per_mol"])
    # the t = T step (molecule 2) is in the fixture: the table's last entry is used, not wrapped
    assert int(fx["nll_t_int"][2]) == 1000


def test_t0_likelihood_matches_the_reference_near_bin_edges(fixture_npz, fixture_parts):
    """The fixture's l0_* inputs sit close to bin edges, so the discretised feature likelihood is far from 0."""
    den, info, mask = fixture_parts
    fx = fixture_npz
    x, z0, eps, eps_hat = (_mols(fx, k) for k in ("xh_norm", "l0_z0", "l0_eps", "l0_net_out"))
    gamma_0 = den.sde.gamma(jnp.zeros(()))
    n_pad = float(9 * mask.shape[1])
    lp_eval = jax.vmap(lambda *a: log_p_xh_given_z0(*a, gamma_0, info))(x, z0, eps, eps_hat, mask)
    lp_train = jax.vmap(lambda *a: log_p_xh_given_z0(*a, gamma_0, info, x_error_norm=n_pad))(x, z0, eps, eps_hat, mask)
    lp_h = jax.vmap(lambda a, b, m: log_p_features_given_z0(a, b, m, gamma_0, info))(x, z0, mask)
    _close(lp_eval, fx["l0_log_p_xh_eval"])
    _close(lp_train, fx["l0_log_p_xh_train"])
    _close(lp_h, fx["l0_log_p_h"])
    assert np.all(np.asarray(fx["l0_log_p_h"]) < -1.0)  # the feature part is exercised, not ~0


def test_vlb_estimator_is_the_mean_over_steps(fixture_parts, fixture_npz):
    """vlb_nll draws t ~ U{1..T}: its mean over many keys equals the average of vlb_terms over all T steps
    (same noise distribution); checked with a short table so the sum is cheap and the estimator converges."""
    den, info, mask = fixture_parts
    x = _mols(fixture_npz, "xh_norm")
    x0, m0 = jax.tree.map(lambda a: a[1], x), mask[1]
    T = 8
    den_small = eqx.tree_at(lambda d: d.sde, den, DiscreteVPSDE.edm_polynomial(T, 2.0, 1e-5))
    keys = jr.split(jr.key(3), 4000)
    est = jax.jit(jax.vmap(lambda k: vlb_nll(den_small, x0, m0, info, key=k, timesteps=T)))(keys)

    def exact_step(t_int, k):
        ke, ke0 = jr.split(k)
        e = com_free_normal(ke, m0, x0.n_feat)
        e0 = com_free_normal(ke0, m0, x0.n_feat)
        return vlb_terms(den_small, x0, m0, info, t_int, e, e0, timesteps=T)["nll"]

    per_t = jax.jit(jax.vmap(lambda k: jax.vmap(lambda t: exact_step(t, k))(jnp.arange(1, T + 1))))(keys[:500])
    exact = float(jnp.mean(per_t))
    se = float(jnp.std(est)) / np.sqrt(est.shape[0])
    assert abs(float(jnp.mean(est)) - exact) < 4 * se + 1e-3 * abs(exact)


# --- PF-ODE likelihood: closed form for Gaussian data --------------------------------------------------------


def _gaussian_case(sde, scale, n_atoms=4, capacity=6, n_feat=2, seed=0):
    mask = jnp.arange(capacity) < n_atoms
    k_mean, k_x = jr.split(jr.key(seed))
    mean = project(Molecule(jr.normal(k_mean, (capacity, 3)), jr.normal(k_mean, (capacity, n_feat))), mask)
    oracle = GaussianOracle(mean, scale, sde)
    x = mean + scale * com_free_normal(k_x, mask, n_feat)
    return oracle, project(x, mask), mask, mean


def _flow_log_prob(oracle, z0, mask, t0, t1):
    """What the PF-ODE likelihood must return for Gaussian data, in closed form. The flow is linear,
    z_T = alpha_T mean + (std_T / std_0)(z_0 - alpha_0 mean), it carries p_{t0} onto the true p_T exactly
    (so its divergence integral is log p_{t0}(z_0) - log p_T(z_T)), and the ODE's density at t0 is that of the
    SDE's prior N(0, sigma_T^2 I) pulled back: log prior(z_T) + log p_{t0}(z_0) - log p_T(z_T)."""
    sde = oracle.sde
    a0, _ = sde.marginal(t0)
    a_T, s_T = sde.marginal(t1)
    std0, std_T = oracle.marginal_std(t0), oracle.marginal_std(t1)
    z_T = project(a_T * oracle.mean + (std_T / std0) * (z0 - a0 * oracle.mean), mask)
    log_p0 = normal_log_prob(project(z0 - a0 * oracle.mean, mask), mask, std0)
    log_pT = normal_log_prob(project(z_T - a_T * oracle.mean, mask), mask, std_T)
    return log_p0 + normal_log_prob(z_T, mask, s_T) - log_pT, log_p0


@pytest.mark.parametrize(
    "sde,scale", [(PolynomialVPSDE(), 0.7), (KarrasSDE(), 1.3), (VESDE(sigma_min=0.01, sigma_max=50.0), 0.5)]
)
def test_pf_ode_log_prob_matches_closed_form(sde, scale):
    """x0 ~ N(mean, s^2 I) on the state space. In float64 this agrees to 4e-6 nats (measured); the float32
    tolerance covers the rounding of a ~200-nat divergence integral (Karras: t from 0.002 to 80)."""
    oracle, x, mask, mean = _gaussian_case(sde, scale)
    t0, t1 = jnp.asarray(sde.t_min), jnp.asarray(sde.t_max)
    alpha0, _ = sde.marginal(t0)
    solve = jax.jit(lambda z: pf_ode_log_prob(oracle, z, mask, rtol=1e-6, atol=1e-6))
    for z0 in (project(alpha0 * x, mask), project(alpha0 * x + 0.5 * com_free_normal(jr.key(5), mask, 2), mask)):
        expected, log_p0 = _flow_log_prob(oracle, z0, mask, t0, t1)
        ours, n_steps = solve(z0)
        assert abs(float(ours) - float(expected)) < 5e-3, (float(ours), float(expected))
        assert int(n_steps) > 1
        # the prior's mismatch with the true p_T is what separates the two; it is small but resolved
        assert abs(float(expected) - float(log_p0)) < 0.1


def test_hutchinson_trace_is_unbiased():
    sde = PolynomialVPSDE()
    oracle, x, mask, mean = _gaussian_case(sde, 0.8, seed=1)
    exact, _ = pf_ode_log_prob(oracle, x, mask, rtol=1e-5, atol=1e-5)
    keys = jr.split(jr.key(11), 64)
    est = jax.jit(jax.vmap(lambda k: pf_ode_log_prob(oracle, x, mask, key=k, exact_trace=False)[0]))(keys)
    se = float(jnp.std(est)) / np.sqrt(len(keys))
    assert abs(float(jnp.mean(est)) - float(exact)) < 4 * se + 1e-2
    with pytest.raises(ValueError, match="needs a key"):
        pf_ode_log_prob(oracle, x, mask, exact_trace=False)


def test_padding_carries_no_density():
    """The same molecule at a larger capacity has the same log-density (padded entries are not dimensions)."""
    sde = PolynomialVPSDE()
    oracle, x, mask, mean = _gaussian_case(sde, 0.9, capacity=5, n_atoms=4)
    wide = lambda a: jnp.concatenate([a, jnp.zeros((3,) + a.shape[1:])], 0)  # noqa: E731
    mask_w = jnp.concatenate([mask, jnp.zeros(3, bool)])
    oracle_w = GaussianOracle(jax.tree.map(wide, mean), oracle.scale, sde)
    # tight tolerances: the step-size controller's RMS norm counts padded zeros, so the two solves take
    # different steps; their difference is the solver's error, not a padding leak
    lp, _ = pf_ode_log_prob(oracle, x, mask, rtol=1e-7, atol=1e-7)
    lp_w, _ = pf_ode_log_prob(oracle_w, jax.tree.map(wide, x), mask_w, rtol=1e-7, atol=1e-7)
    assert abs(float(lp) - float(lp_w)) < 1e-3


def test_vlb_bounds_the_exact_nll_of_gaussian_data():
    """Positions-only data x ~ N(0, s^2 I) on the CoM-free subspace, exact denoiser, EDM's T = 1000 table: the
    bound, summed over every step (no t-sampling variance), lies above the exact NLL by a gap that does not
    depend on the data scale (measured: 5.8 nats for 15 dimensions). The gap is the discretisation's: near
    t = 0, EDM's steps change the SNR by ~20 % each, where every smooth density looks flat."""
    sde = DiscreteVPSDE.edm_polynomial()
    info = DatasetInfo(
        atom_decoder=(), atomic_numbers=(), include_charges=False, max_n_atoms=6, size_counts=(0,) * 6 + (1,)
    )
    mask = jnp.ones(6, bool)
    gaps = []
    for scale in (0.5, 2.0):
        oracle = GaussianOracle(Molecule(jnp.zeros((6, 3)), jnp.zeros((6, 0))), scale, sde)
        xs = jax.vmap(lambda k, s=scale: project(s * com_free_normal(k, mask, 0), mask))(jr.split(jr.key(0), 400))

        def bound(x, key, oracle=oracle):
            def term(t, k):
                e, e0 = com_free_normal(k, mask, 0), com_free_normal(jr.fold_in(k, 1), mask, 0)
                return vlb_terms(oracle, x, mask, info, t, e, e0)

            tt = jax.vmap(term)(jnp.arange(1, 1001), jr.split(key, 1000))
            return tt["kl_prior"][0] + jnp.sum(tt["loss_t"]) + tt["neg_log_constants"][0] + jnp.mean(tt["loss_term_0"])

        v = jax.jit(jax.vmap(bound))(xs, jr.split(jr.key(2), 400))
        exact = jax.vmap(lambda x, s=scale: -normal_log_prob(x, mask, s))(xs)
        gap = v - exact
        se = float(jnp.std(gap)) / np.sqrt(len(gap))
        assert float(jnp.mean(gap)) > 4 * se  # an upper bound
        gaps.append(float(jnp.mean(gap)))
    assert 0 < gaps[0] < 0.5 * 15 and abs(gaps[0] - gaps[1]) < 0.5, gaps
