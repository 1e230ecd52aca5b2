"""sde_mol.objectives.denoising: EDM's eps-L2 against the reference fixture (including the t = 0 branch), the
batch loss, gradients that reach only the network, and the Karras and continuous-time losses against their
closed-form values for the exact denoiser of Gaussian data."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from sde_mol.denoisers import AbstractX0Denoiser
from sde_mol.molecule import Molecule, com_free_normal, project
from sde_mol.objectives.denoising import ContinuousDenoisingLoss, EDMEpsLoss, KarrasLoss
from sde_mol.oracle import GaussianOracle
from sde_mol.sde import VESDE, CosineVPSDE, KarrasSDE, PolynomialVPSDE


@pytest.fixture(scope="module")
def ref(fixture_reference):
    return fixture_reference


def _mols(fx, key):
    a = jnp.asarray(fx[key], jnp.float32)
    return Molecule(a[..., :3], a[..., 3:])


def _close(ours, want, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol)


def test_edm_loss_terms_match_the_reference(fixture_npz, ref):
    den, info, mask = ref
    fx = fixture_npz
    objective = EDMEpsLoss(info, timesteps=1000, n_pad=int(mask.shape[1]))
    assert int(fx["loss_t_int"][0]) == 0  # molecule 0 takes the t = 0 likelihood branch
    with jax.default_matmul_precision("highest"):
        terms = eqx.filter_jit(jax.vmap(lambda x, m, t, e: objective.terms(den, x, m, t, e)))(
            _mols(fx, "xh_norm"), mask, jnp.asarray(fx["loss_t_int"]), _mols(fx, "loss_eps")
        )
    _close(terms["error"], fx["loss_error"])
    _close(terms["term_0"], fx["loss_term_0_all"])
    _close(terms["t_term"], fx["loss_t_term"])
    _close(terms["kl_prior"], fx["loss_kl_prior"], rtol=0, atol=2e-6)
    _close(terms["l2_per_mol"], fx["loss_l2_per_mol"])
    _close(terms["neg_log_pn"], fx["loss_neg_log_pN"])
    _close(terms["total"], fx["loss_l2_total_per_mol"])
    _close(jnp.mean(terms["total"]), fx["loss_l2_batch"])
    # the t = 0 branch is a different number from the L2 branch would have been
    assert abs(float(terms["term_0"][0]) - 0.5 * float(terms["error"][0])) > 1e-3


def test_edm_padding_width_rescales_only_the_error(fixture_npz, ref):
    """EDM divides the L2 error by (3 + n_feat) * N_pad; the default N_pad is the capacity of the batch."""
    den, info, mask = ref
    fx = fixture_npz
    x, e = jax.tree.map(lambda a: a[2], _mols(fx, "xh_norm")), jax.tree.map(lambda a: a[2], _mols(fx, "loss_eps"))
    t = jnp.asarray(fx["loss_t_int"][2])
    wide = eqx.filter_jit(EDMEpsLoss(info, n_pad=24).terms)(den, x, mask[2], t, e)
    base = eqx.filter_jit(EDMEpsLoss(info).terms)(den, x, mask[2], t, e)  # capacity 12
    _close(wide["error"] * 2, base["error"], rtol=1e-6)
    _close(wide["kl_prior"], base["kl_prior"], rtol=1e-6)


def test_batch_loss_is_the_weighted_mean_of_loss_one(fixture_npz, ref):
    den, info, mask = ref
    xs = _mols(fixture_npz, "xh_norm")
    objective = EDMEpsLoss(info)
    key = jr.key(4)
    weights = jnp.array([1.0, 1.0, 0.0])  # a fill-in row carries no weight
    loss, aux = eqx.filter_jit(objective.batch_loss)(den, xs, mask, weights, key=key, step=0)
    rows = [jax.tree.map(lambda a, i=i: a[i], xs) for i in range(2)]
    one = eqx.filter_jit(objective.loss_one)
    per = [one(den, rows[i], mask[i], key=jr.fold_in(key, i), step=0)[0] for i in range(2)]
    _close(loss, (per[0] + per[1]) / 2, rtol=1e-6)
    assert set(aux) == {"l2", "kl_prior"}


def test_edm_loss_gradient_reaches_only_the_network(ref, fixture_npz):
    den, info, mask = ref
    xs = _mols(fixture_npz, "xh_norm")
    objective = EDMEpsLoss(info)

    def loss(model):
        return objective.batch_loss(model, xs, mask, jnp.ones(3), key=jr.key(0), step=0)[0]

    grads = eqx.filter_jit(eqx.filter_grad(loss))(den)
    assert float(jnp.max(jnp.abs(grads.sde.gamma_table))) == 0.0
    leaves = jax.tree.leaves(eqx.filter(grads.net, eqx.is_inexact_array))
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


def test_low_noise_mixture_draws(ref):
    """p = 0 is EDM's uniform draw, key for key; p > 0 puts a share p + (1 - p) (k + 1) / (T + 1) of the steps at
    t_int <= k = floor(T t_max), uniformly there, and still reaches every step above; bad settings are refused."""
    _, info, _ = ref
    keys = jr.split(jr.key(3), 40_000)
    edm = jax.vmap(EDMEpsLoss(info, timesteps=1000).draw_step)(keys)
    np.testing.assert_array_equal(edm, jax.vmap(lambda k: jr.randint(k, (), 0, 1001))(keys))
    draws = np.asarray(jax.vmap(EDMEpsLoss(info, low_noise_fraction=0.5, low_noise_t_max=0.1).draw_step)(keys))
    low = draws <= 100
    want = 0.5 + 0.5 * 101 / 1001
    assert abs(low.mean() - want) < 4 * np.sqrt(want * (1 - want) / draws.size)  # 4 standard errors
    assert draws.min() == 0 and draws.max() == 1000
    counts = np.bincount(draws[low], minlength=101)  # uniform on 0..100: every step drawn, none twice as often
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
    above = np.bincount(draws[~low] - 101, minlength=900)
    assert abs(above[:450].sum() - above[450:].sum()) < 4 * np.sqrt(above.sum())  # uniform above t_max
    for bad in ({"low_noise_fraction": 1.5}, {"low_noise_fraction": -0.1}):
        with pytest.raises(ValueError, match="low_noise_fraction"):
            EDMEpsLoss(info, **bad)
    for bad in (0.0, 1.2, 0.0005):
        with pytest.raises(ValueError, match="low_noise_t_max"):
            EDMEpsLoss(info, low_noise_fraction=0.5, low_noise_t_max=bad)


# --- closed forms for Gaussian data -----------------------------------------------------------------------


class _WithSigmaData(AbstractX0Denoiser):
    """The Gaussian oracle seen as a Karras denoiser with sigma_data (KarrasLoss reads `model.sigma_data`)."""

    oracle: GaussianOracle
    sde: KarrasSDE
    sigma_data: float

    def __call__(self, t, z, mask):
        return self.oracle(t, z, mask)


def _gaussian(sde, scale, n_atoms=5, capacity=7, n_feat=3):
    mask = jnp.arange(capacity) < n_atoms
    mean = project(Molecule(jr.normal(jr.key(1), (capacity, 3)), jr.normal(jr.key(2), (capacity, n_feat))), mask)
    return GaussianOracle(mean, scale, sde), mean, mask


def _data(oracle, mean, mask, n, seed=0):
    keys = jr.split(jr.key(seed), n)
    return jax.vmap(lambda k: project(mean + oracle.scale * com_free_normal(k, mask, mean.n_feat), mask))(keys)


def test_karras_loss_of_the_exact_denoiser_is_one():
    """With sigma_data equal to the data's scale, Karras' weight times the posterior variance is exactly 1 at
    every noise level: lambda(s) * sd^2 s^2 / (sd^2 + s^2) = 1. So the exact denoiser's loss averages to 1."""
    scale = 0.8
    sde = KarrasSDE()
    oracle, mean, mask = _gaussian(sde, scale)
    model = _WithSigmaData(oracle, sde, scale)
    xs = _data(oracle, mean, mask, 4000)
    keys = jr.split(jr.key(9), 4000)
    losses = jax.jit(jax.vmap(lambda x, k: KarrasLoss().loss_one(model, x, mask, key=k, step=0)[0]))(xs, keys)
    se = float(jnp.std(losses)) / np.sqrt(len(losses))
    assert abs(float(jnp.mean(losses)) - 1.0) < 4 * se
    # a worse denoiser (the wrong data scale) scores higher
    bad = _WithSigmaData(GaussianOracle(mean, 2 * scale, sde), sde, scale)
    worse = jax.jit(jax.vmap(lambda x, k: KarrasLoss().loss_one(bad, x, mask, key=k, step=0)[0]))(xs, keys)
    assert float(jnp.mean(worse)) > 1.0 + 10 * se


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
@pytest.mark.parametrize("sde", [PolynomialVPSDE(), CosineVPSDE(), VESDE()])
def test_continuous_loss_of_the_exact_denoiser_is_the_posterior_variance(sde, target):
    """For x0 ~ N(mean, s^2 I) the exact denoiser's x0 error per dimension is the posterior variance
    v(t) = s^2 sigma^2 / (alpha^2 s^2 + sigma^2); the eps and v errors are v alpha^2 / sigma^2 and
    v (alpha^2 + sigma^2)^2 / sigma^2. The loss averaged over t ~ U(t_min, t_max) is their time average."""
    scale = 0.6
    oracle, mean, mask = _gaussian(sde, scale)
    n = 6000
    xs = _data(oracle, mean, mask, n, seed=3)
    keys = jr.split(jr.key(10), n)
    objective = ContinuousDenoisingLoss(target=target)
    losses = jax.jit(jax.vmap(lambda x, k: objective.loss_one(oracle, x, mask, key=k, step=0)[0]))(xs, keys)
    ts = jnp.linspace(sde.t_min, sde.t_max, 20001)
    alpha, sigma = jax.vmap(sde.marginal)(ts)
    v = scale**2 * sigma**2 / (alpha**2 * scale**2 + sigma**2)
    factor = {"x0": 1.0, "eps": alpha**2 / sigma**2, "v": (alpha**2 + sigma**2) ** 2 / sigma**2}[target]
    expected = float(jnp.mean(v * factor))
    se = float(jnp.std(losses)) / np.sqrt(n)
    assert abs(float(jnp.mean(losses)) - expected) < 4 * se + 1e-3 * expected, (float(jnp.mean(losses)), expected)


def test_continuous_loss_rejects_an_unknown_target():
    with pytest.raises(ValueError, match="target"):
        ContinuousDenoisingLoss(target="score")


def test_eps_error_is_zero_for_the_exact_denoiser_at_low_noise_and_counts_state_entries():
    """`eps_error` (the per-level validation probe of train_edm): the exact oracle of K molecules recovers the
    noise of one of its own molecules at low noise (error ~ 0), not at high noise (where x0 is ambiguous); the
    count is (3 + n_feat) * atoms."""
    from sde_mol.objectives.denoising import eps_error
    from sde_mol.oracle import OracleDenoiser, toy_molecules

    sde = PolynomialVPSDE()
    data, mask = toy_molecules(jr.key(0), 4, 7, 9)
    oracle = OracleDenoiser(data, mask, sde)
    x = jax.tree.map(lambda a: a[2], data)
    eps = com_free_normal(jr.key(1), mask, x.n_feat)
    low, n = eps_error(oracle, x, mask, 0.05, eps)
    high, _ = eps_error(oracle, x, mask, 0.95, eps)
    assert float(n) == 7 * (3 + x.n_feat)
    assert float(low) / float(n) < 1e-8 and float(high) / float(n) > 1e-3
