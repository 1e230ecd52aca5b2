"""The library's promise: a new SDE is one small class (only `marginal`), and every sampler works with it."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from sde_mol.oracle import OracleDenoiser, toy_molecules
from sde_mol.samplers import DDIM, PFODE
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
        lambda k: PFODE(dfx.Heun(), 60)(oracle, mask, 6, key=k)[0],
        lambda k: DDIM(60)(oracle, mask, 6, key=k)[0],
    ):
        out = jax.vmap(sampler)(keys)
        rmsd = jax.vmap(nearest_rmsd)(out)
        assert float(jnp.mean(rmsd < 0.05)) >= 0.98


class ShiftedVESDE(AbstractSDE):
    """A user's variance-exploding SDE on t in [0.02, 3] (not [0, 1]): alpha = 1, sigma = t."""

    t_min: float = 0.02
    t_max: float = 3.0

    def marginal(self, t):
        return jnp.ones_like(t), t


def _mlp_net(key):
    from sde_mol.nn.egnn import MLPNet

    return MLPNet(8, 6, 32, 2, key=key)


def test_a_user_sde_on_its_own_interval_trains_samples_and_distils():
    """By library import only: a denoiser trains on the user's SDE, samples, and one progressive-distillation
    halving and a few consistency-distillation steps run, every time drawn inside [t_min, t_max]; EDM's
    discrete loss refuses the SDE instead of using t in [0, 1]."""
    import equinox as eqx
    import optax
    import pytest

    from sde_mol.data.qm9 import qm9_info
    from sde_mol.denoisers import ConsistencyFunction, KarrasDenoiser
    from sde_mol.objectives.consistency import ConsistencyLoss, TeacherStep
    from sde_mol.objectives.denoising import ContinuousDenoisingLoss, EDMEpsLoss
    from sde_mol.objectives.progressive import HalvingSchedule, ProgressiveDistillation
    from sde_mol.run.build import solver_from_name
    from sde_mol.schedules import constant_n
    from sde_mol.training.state import init_state, make_step

    sde = ShiftedVESDE()
    data, mask = toy_molecules(jr.PRNGKey(0), 3, 6, 8)
    batch = jax.tree.map(lambda a: jnp.tile(a, (4,) + (1,) * (a.ndim - 1)), data)
    masks, weights = jnp.broadcast_to(mask, (12, mask.shape[0])), jnp.ones(12)
    oracle = OracleDenoiser(data, mask, sde)
    opt = optax.adam(1e-3)

    def train(objective, model, steps, **kw):
        state = init_state(model, opt, with_target=kw.pop("with_target", False))
        step = make_step(objective, opt, ema_decay=0.0, **kw)
        ts = []
        for _ in range(steps):
            state, aux = step(state, batch, masks, weights, jr.PRNGKey(3))
            assert np.isfinite(float(aux["loss"]))
            ts.append(np.asarray(aux.get("t", np.nan)))
        return state, np.concatenate([np.ravel(t) for t in ts])

    student = KarrasDenoiser(_mlp_net(jr.PRNGKey(1)), sde, sigma_data=1.0)
    state, ts = train(ContinuousDenoisingLoss("x0"), student, 5)
    assert np.all((ts >= sde.t_min) & (ts <= sde.t_max)) and ts.max() > 1.0
    out, _ = PFODE(dfx.Heun(), 8)(state.model, mask, 6, key=jr.PRNGKey(2))
    assert np.all(np.isfinite(np.asarray(out.positions)))

    schedule = HalvingSchedule(8, 4, 1)
    pd = ProgressiveDistillation(sde, schedule, oracle)
    _, ts = train(pd, student, 4, with_target=True, target_decay=schedule.target_decay)
    assert np.all((ts > sde.t_min) & (ts <= sde.t_max + 1e-6)) and ts.max() > 1.0  # the grid spans [t_min, t_max]

    cd = ConsistencyLoss(TeacherStep(oracle, solver_from_name("heun")), eqx.Partial(constant_n, n=10))
    train(cd, ConsistencyFunction(_mlp_net(jr.PRNGKey(4)), sde, sigma_data=1.0), 3, with_target=True)

    edm = EDMEpsLoss(qm9_info())
    with pytest.raises(ValueError, match=r"needs an SDE on t in \[0, 1\]; ShiftedVESDE runs on \[0.02, 3.0\]"):
        edm.loss_one(student, jax.tree.map(lambda a: a[0], data), mask, key=jr.PRNGKey(0), step=0)
