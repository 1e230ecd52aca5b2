"""Consistency models (CPU): exact boundary condition, CoM-free outputs, E(3) equivariance with an EGNN, the CD
teacher estimator against diffeqsolve, one compilation for a changing curriculum N(k), the consistency sampler,
truncated consistency models (TCM: the joined function, the truncated index and boundary targets), and CD / CT
against the exact oracle of K toy molecules, with and without TCM's stage 2.

The manual teacher step (`terms.teacher_step`) equals `diffeqsolve` for every solver in tests/test_samplers.py;
here the CD estimator that wraps it (`TeacherStep`, with its projection) is pinned against `diffeqsolve` over
[t_n, t_{n+1}] backwards in time on the grid the objective draws.

Students for the oracle tests are MLPs (`nn.MLPNet`) wrapped in `ConsistencyFunction`: the plain oracle is not
rotation-invariant, so an equivariant student could not represent it (the slow test uses an EGNN against the
rotation-augmented oracle instead). Molecules: K = 4 toy molecules of 7 atoms (9 slots), pairwise RMSDs above
1 A, so "within 0.1 A" of a molecule means "on that molecule".
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from sde_mol.data.fixed import tiled_batch, toy_oracle
from sde_mol.denoisers import (
    AbstractX0Denoiser,
    ConsistencyFunction,
    EpsConsistencyFunction,
    TruncatedConsistencyFunction,
)
from sde_mol.molecule import Molecule, com_free_normal, project, random_orthogonal, transform
from sde_mol.nn.egnn import EGNN, MLPNet
from sde_mol.objectives.consistency import (
    AbstractIndexSampler,
    ConsistencyLoss,
    InverseStepWeighting,
    LogNormalIndex,
    PseudoHuberDistance,
    TeacherStep,
    TruncatedIndex,
    UnbiasedEstimator,
    truncated_loss,
    truncation_node,
)
from sde_mol.oracle import landing, rotation_augmented
from sde_mol.run.build import build_sampler, consistency_times_of, solver_from_name
from sde_mol.run.configs import SamplerConfig
from sde_mol.samplers import Consistency, consistency_solve, consistency_times
from sde_mol.schedules import constant_n, ict_n, karras_sigma, song_ct_n
from sde_mol.sde import VESDE, AbstractSDE, KarrasSDE, PolynomialVPSDE
from sde_mol.terms import pf_ode_term
from sde_mol.training.state import fit_tiled, init_state, make_step

K, M, CAPACITY, N_FEAT = 4, 7, 9, 6
SDE = PolynomialVPSDE()  # EDM's schedule in continuous time
ORACLE = toy_oracle(SDE, n_molecules=K, n_atoms=M, capacity=CAPACITY)
DATA, MASK = ORACLE.data, ORACLE.mask
SAMPLE_KEYS = jr.split(jr.key(99), 500)


# --- helpers -----------------------------------------------------------------------------------------------


def mlp_student(
    hidden: int, *, key, sde: AbstractSDE = SDE, sigma_data: float = 0.5, depth: int = 3
) -> ConsistencyFunction:
    """A consistency function on an MLP."""
    return ConsistencyFunction(MLPNet(CAPACITY, N_FEAT, hidden, depth, key=key), sde, sigma_data=sigma_data)


def egnn_net(*, key, hidden: int = 16, n_layers: int = 2) -> EGNN:
    return EGNN(N_FEAT, hidden, n_layers, key=key)


def truncated_egnn(net, sde: AbstractSDE, sigma: float = 0.3) -> TruncatedConsistencyFunction:
    """A truncated consistency function of two EGNN consistency functions (`net` above sigma)."""
    low = ConsistencyFunction(egnn_net(key=jr.key(77)), sde)
    return TruncatedConsistencyFunction(low, ConsistencyFunction(net, sde), sigma)


def _state(key, scale: float = 1.0) -> Molecule:
    k1, k2 = jr.split(key)
    return project(Molecule(scale * jr.normal(k1, (CAPACITY, 3)), scale * jr.normal(k2, (CAPACITY, N_FEAT))), MASK)


def consistency_positions(f, n_steps: int, keys=SAMPLE_KEYS):
    """Positions of n_steps consistency samples (default times); sample i starts from the prior noise of
    keys[i] whatever n_steps is."""
    ts = consistency_times(SDE, n_steps)
    fn = jax.vmap(lambda k: Consistency(ts)(f, MASK, N_FEAT, key=k)[0].positions)
    return np.asarray(jax.jit(fn)(keys))[:, :M]


def kabsch_rmsd(a, b):
    """RMSD between point sets a, b (n, 3; both centred) after the best orthogonal map of a onto b (rotation or
    reflection: an E(3)-equivariant model samples a molecule and its mirror image alike)."""
    u, _, vt = np.linalg.svd(a.T @ b)
    best = np.inf
    for sign in (1.0, -1.0):
        rot = u @ np.diag([1.0, 1.0, sign]) @ vt  # the optimal map of determinant sign * det(u vt)
        best = min(best, float(np.sqrt(((a @ rot - b) ** 2).sum(-1).mean())))
    return best


class Scaled(AbstractX0Denoiser):
    """x0 = a * z (a stand-in network-free denoiser for the sampler test)."""

    scale: float
    sde: AbstractSDE

    def __call__(self, t, z, mask):
        return self.scale * z


# --- the consistency function ----------------------------------------------------------------------------------


@eqx.filter_jit
def _compiled(f, t, z):
    """f(t, z) on MASK, compiled (t traced; one compilation per model structure). An eager EGNN call costs ~1 s
    on a CPU, op by op; the tests below call compiled models except where eager evaluation is the point."""
    return f(t, z, MASK)


@pytest.mark.parametrize("sde", [SDE, KarrasSDE(), VESDE()], ids=["vp_polynomial", "karras", "ve"])
def test_boundary_condition_is_exact(sde):
    """f(t_min, z) = z / alpha(t_min) bitwise, eagerly and compiled (t traced), for both consistency
    functions; away from t_min the network matters."""
    z = _state(jr.key(1), 2.0)
    alpha = sde.marginal(sde.t_min)[0]
    expected = z / alpha
    students = [
        mlp_student(32, key=jr.key(2), sde=sde),
        ConsistencyFunction(egnn_net(key=jr.key(3)), sde),
        EpsConsistencyFunction(egnn_net(key=jr.key(4)), sde),
        truncated_egnn(egnn_net(key=jr.key(5)), sde, sigma=0.5),
    ]
    for f in students:
        for out in (f(sde.t_min, z, MASK), _compiled(f, jnp.float32(sde.t_min), z)):
            np.testing.assert_array_equal(out.positions, expected.positions)
            np.testing.assert_array_equal(out.features, expected.features)
        t_mid = jnp.float32(0.5 * (sde.t_min + sde.t_max))
        assert not np.allclose(_compiled(f, t_mid, z).positions, z.positions / sde.marginal(t_mid)[0], atol=1e-3)


PARAMS = [ConsistencyFunction, EpsConsistencyFunction, truncated_egnn]
PARAM_IDS = ["consistency", "eps_consistency", "truncated"]


@pytest.mark.parametrize("param", PARAMS, ids=PARAM_IDS)
def test_outputs_are_com_free_and_padding_free(param):
    f = param(egnn_net(key=jr.key(5)), SDE)
    for t in (0.0, 0.01, 0.3, 1.0):
        out = _compiled(f, jnp.float32(t), _state(jr.key(6)))
        scale = float(jnp.max(jnp.abs(out.positions)))  # ~300 at t_max for the eps form: z / alpha dominates
        np.testing.assert_allclose(np.asarray(out.positions).sum(0), 0.0, atol=1e-6 * max(scale, 1.0) * M)
        assert np.all(np.asarray(out.positions)[~np.asarray(MASK)] == 0.0)
        assert np.all(np.asarray(out.features)[~np.asarray(MASK)] == 0.0)
    mlp = mlp_student(32, key=jr.key(7))(jnp.float32(0.4), _state(jr.key(8)), MASK)
    np.testing.assert_allclose(np.asarray(mlp.positions).sum(0), 0.0, atol=1e-5)


@pytest.mark.parametrize(
    ("param", "seed"),
    [(ConsistencyFunction, 0), (ConsistencyFunction, 1), (EpsConsistencyFunction, 0), (EpsConsistencyFunction, 1),
     (truncated_egnn, 0)],  # the joined function: as equivariant as its parts, one seed
    ids=["consistency-0", "consistency-1", "eps_consistency-0", "eps_consistency-1", "truncated-0"],
)  # fmt: skip
def test_egnn_consistency_function_is_e3_equivariant(param, seed):
    """A random rotation or reflection plus a translation of the (CoM-free) input, projected back onto the
    CoM-free state space: positions rotate, features are invariant, both stay CoM-free."""
    f = param(egnn_net(key=jr.key(10 + seed), hidden=32, n_layers=3), SDE)
    k_rot, k_shift, k_z = jr.split(jr.key(seed), 3)
    rot = random_orthogonal(k_rot, reflect=True)
    z = _state(k_z)
    moved = project(transform(z, MASK, rot, 3.0 * jr.normal(k_shift, (3,))), MASK)
    for t in (0.05, 0.5, 1.0):
        out, out_moved = _compiled(f, jnp.float32(t), z), _compiled(f, jnp.float32(t), moved)
        scale = float(jnp.max(jnp.abs(out.positions)))  # ~1e-2 at t_max: an untrained net's c_out F
        assert scale > 1e-3
        np.testing.assert_allclose(out_moved.positions, out.positions @ rot.T, atol=3e-5 * max(scale, 1.0))
        np.testing.assert_allclose(out_moved.features, out.features, atol=3e-5 * max(scale, 1.0))
        np.testing.assert_allclose(np.asarray(out_moved.positions).sum(0), 0.0, atol=1e-6 * max(scale, 1.0) * M)


def test_truncated_consistency_function_switches_at_its_level():
    """Low at s <= s' (and within the level's float tolerance), high above; eagerly and compiled (to float
    rounding: the branches compile inside a cond)."""
    low, high = mlp_student(16, key=jr.key(1)), mlp_student(16, key=jr.key(2))
    f = TruncatedConsistencyFunction(low, high, 0.5)
    assert f.sde is high.sde
    z = _state(jr.key(3))
    compiled = eqx.filter_jit(lambda f, t, z: f(t, z, MASK))
    for s_level, part, other in ((0.01, low, high), (0.5, low, high), (0.50002, low, high), (0.51, high, low),
                                 (50.0, high, low)):  # fmt: skip
        t = SDE.t_from_logsnr(-2.0 * jnp.log(jnp.float32(s_level)))
        want, away = part(t, z, MASK).positions, other(t, z, MASK).positions
        assert float(jnp.max(jnp.abs(want - away))) > 1e-3
        for out in (f(t, z, MASK), compiled(f, t, z)):
            np.testing.assert_allclose(out.positions, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must be > 0"):
        TruncatedConsistencyFunction(low, high, 0.0)


# --- the objective ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver_name", ["euler", "heun"])
def test_cd_teacher_step_equals_diffeqsolve_on_the_grid(solver_name):
    """The CD estimator (one teacher step t_{n+1} -> t_n) equals diffeqsolve over [t_{n+1}, t_n] with the same
    solver, on every interval of the objective's N = 18 grid of the VP schedule (time flipped by diffrax)."""
    solver = solver_from_name(solver_name)
    loss = ConsistencyLoss(TeacherStep(ORACLE, solver), eqx.Partial(constant_n, n=18))
    term = pf_ode_term(ORACLE, SDE)
    x = jax.tree.map(lambda a: a[1], DATA)

    @jax.jit
    def both(n, key):
        _, _, t_cur, t_next = loss.grid_pair(SDE, n, 18)
        noise = com_free_normal(key, MASK, N_FEAT)
        alpha, sigma = SDE.marginal(t_next)
        z_next = alpha * x + sigma * noise
        manual = loss.estimator(SDE, x, z_next, noise, MASK, t_next, t_cur)
        grid = dfx.StepTo(jnp.stack([t_next, t_cur]))
        sol = dfx.diffeqsolve(term, solver, t_next, t_cur, None, z_next, args=MASK, stepsize_controller=grid)
        return manual, jax.tree.map(lambda a: a[-1], sol.ys), z_next

    for n in range(17):
        manual, reference, z_next = both(n, jr.key(n))
        scale = float(jnp.max(jnp.abs(reference.positions)))
        np.testing.assert_allclose(manual.positions, reference.positions, rtol=0, atol=2e-6 * max(scale, 1.0))
        np.testing.assert_allclose(manual.features, reference.features, rtol=0, atol=2e-6 * max(scale, 1.0))
        if solver_name == "heun" or n < 16:  # the polynomial schedule's drift vanishes at t_max: Euler stays put
            assert float(jnp.max(jnp.abs(manual.positions - z_next.positions))) > 1e-4


def test_curriculum_changes_n_without_recompiling():
    """Song's N(k) grows over the steps and the target EMA rate is traced too: one compilation throughout."""
    objective = ConsistencyLoss(
        UnbiasedEstimator(),
        eqx.Partial(song_ct_n, total_steps=8, s0=2, s1=40),
        PseudoHuberDistance(),
        InverseStepWeighting(),
        LogNormalIndex(),
    )
    optimizer = optax.adam(1e-3)
    state = init_state(mlp_student(16, key=jr.key(1)), optimizer, with_target=True)
    step = make_step(objective, optimizer, ema_decay=0.5, target_decay=lambda k: 0.9 - 0.01 * k, max_traces=1)
    mols, masks, weights = tiled_batch(DATA, MASK, 2 * K)
    seen = []
    for _ in range(10):
        state, aux = step(state, mols, masks, weights, jr.key(0))
        seen.append(int(aux["n_points"]))
        assert np.isfinite(float(aux["loss"]))
    assert seen == [int(song_ct_n(k, 8, 2, 40)) for k in range(10)] and len(set(seen)) >= 5
    assert step.num_traces() == 1
    # iCT's doubling curriculum, without a target model: also one compilation
    ict = eqx.tree_at(lambda o: o.n_points, objective, eqx.Partial(ict_n, total_steps=6, s0=2, s1=16))
    state = init_state(mlp_student(16, key=jr.key(1)), optimizer)
    step = make_step(ict, optimizer, ema_decay=0.0, max_traces=1)
    seen = [int(aux["n_points"]) for _, aux in _run(step, state, mols, masks, weights, 6)]
    assert seen == [int(ict_n(k, 6, 2, 16)) for k in range(6)] and len(set(seen)) >= 3
    assert step.num_traces() == 1
    # iCT's stages: N doubles from s0 + 1 to s1 + 1 in log2(s1 / s0) + 1 equal stages; s1 < s0 is refused
    assert [int(ict_n(k, 40, 10, 80)) for k in (0, 9, 10, 20, 30, 39, 100)] == [11, 11, 21, 41, 81, 81, 81]
    with pytest.raises(ValueError, match="s0 <= s1"):
        ict_n(0, 10, s0=10, s1=8)


class FixedIndex(AbstractIndexSampler):
    n: int

    def __call__(self, n_points, s_min, s_max, rho, *, key):
        return jnp.int32(self.n)


@jax.jit
def draw_truncated(keys, n_points, s_min, s_max):  # N is an argument: traced, one compilation for every N
    return jax.vmap(lambda k: TruncatedIndex(0.16)(n_points, s_min, s_max, 7.0, key=k))(keys)


def test_truncation_node_and_index():
    """n' is the last grid node at or below s' (a node itself counts, also a few ulps below it); the truncated
    index draws every interval from n' up and none below, for a traced N."""
    s_min, s_max = SDE.scaled_sigma(SDE.t_min), SDE.scaled_sigma(SDE.t_max)
    for n_points in (18, 41):
        nodes = np.asarray(jax.vmap(lambda i, n=n_points: karras_sigma(i, n, s_min, s_max, 7.0))(jnp.arange(n_points)))
        for i in (1, 3, n_points // 2):
            for level, expected in ((nodes[i], i), (nodes[i] * (1 - 1e-6), i), (0.5 * (nodes[i] + nodes[i + 1]), i)):
                assert int(truncation_node(float(level), jnp.int32(n_points), s_min, s_max, 7.0)) == expected
        drawn = np.asarray(draw_truncated(jr.split(jr.key(0), 4000), jnp.int32(n_points), s_min, s_max))
        lo = int(truncation_node(0.16, jnp.int32(n_points), s_min, s_max, 7.0))
        assert nodes[lo] <= 0.16 < nodes[lo + 1]
        assert set(drawn.tolist()) == set(range(lo, n_points - 1))
    assert draw_truncated._cache_size() == 1


@jax.jit
def draw_boundary_share(keys, n_points, s_min, s_max):
    return jax.vmap(lambda k: TruncatedIndex(0.16, 0.25)(n_points, s_min, s_max, 7.0, key=k))(keys)


def test_truncated_index_with_a_boundary_share():
    """boundary_fraction p: n' with probability p at every N (a binomial 5-sigma band over 8000 draws), the
    intervals above it uniformly, none below; one compilation for a traced N; p outside (0, 1) is refused."""
    s_min, s_max = SDE.scaled_sigma(SDE.t_min), SDE.scaled_sigma(SDE.t_max)
    draws = 8000
    for n_points in (18, 161):
        lo = int(truncation_node(0.16, jnp.int32(n_points), s_min, s_max, 7.0))
        drawn = np.asarray(draw_boundary_share(jr.split(jr.key(1), draws), jnp.int32(n_points), s_min, s_max))
        share = np.mean(drawn == lo)
        assert abs(share - 0.25) < 5 * np.sqrt(0.25 * 0.75 / draws), (n_points, share)
        above = drawn[drawn != lo]
        assert set(above.tolist()) == set(range(lo + 1, n_points - 1))
        counts = np.bincount(above - lo - 1)  # uniform above n': every count near its mean
        mean = above.size / counts.size
        assert np.all(np.abs(counts - mean) < 5 * np.sqrt(mean)), counts
    assert draw_boundary_share._cache_size() == 1
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="boundary_fraction"):
            TruncatedIndex(0.16, bad)


def test_truncated_loss_takes_its_targets_from_the_boundary_at_and_below_the_level():
    """TCM's stage 2: on intervals n <= n' the target is the boundary model's, above it the target
    network's; the loss equals the plain loss with that model as the target."""
    model, target, boundary = (mlp_student(16, key=jr.key(k)) for k in (1, 2, 3))
    n_points, level = 18, 0.16
    s_min, s_max = SDE.scaled_sigma(SDE.t_min), SDE.scaled_sigma(SDE.t_max)
    lo = int(truncation_node(level, jnp.int32(n_points), s_min, s_max, 7.0))
    x = jax.tree.map(lambda a: a[0], DATA)
    for n in (lo - 1, lo, lo + 1, n_points - 2):
        common = (UnbiasedEstimator(), eqx.Partial(constant_n, n=n_points), PseudoHuberDistance(),
                  InverseStepWeighting(), FixedIndex(n))  # fmt: skip
        truncated = ConsistencyLoss(*common, boundary=boundary, boundary_sigma=level)
        plain = ConsistencyLoss(*common)
        got = truncated.loss_one(model, x, MASK, key=jr.key(4), step=0, target=target)[0]
        want = plain.loss_one(model, x, MASK, key=jr.key(4), step=0, target=boundary if n <= lo else target)[0]
        other = plain.loss_one(model, x, MASK, key=jr.key(4), step=0, target=target if n <= lo else boundary)[0]
        np.testing.assert_array_equal(got, want)
        assert float(jnp.abs(got - other)) > 1e-6
    with pytest.raises(ValueError, match="both boundary and boundary_sigma"):
        ConsistencyLoss(*common, boundary=boundary)
    with pytest.raises(ValueError, match="must be > 0"):
        ConsistencyLoss(*common, boundary=boundary, boundary_sigma=-1.0)


def _run(step, state, mols, masks, weights, n):
    out = []
    for _ in range(n):
        state, aux = step(state, mols, masks, weights, jr.key(0))
        out.append((state, aux))
    return out


# --- the sampler -------------------------------------------------------------------------------------------------


def test_consistency_times_and_config():
    """Default multistep times: iCT's midpoint s = 0.821 for two steps, rho-spaced below it for more, as SDE
    times; explicit --sampler.consistency-sigmas map through the SDE; nfe = steps."""
    assert consistency_times(SDE, 1).shape == (0,)
    (t2,) = consistency_times(SDE, 2)
    np.testing.assert_allclose(float(SDE.scaled_sigma(t2)), 0.821, rtol=1e-4)
    s4 = np.asarray(jax.vmap(SDE.scaled_sigma)(consistency_times(SDE, 4)))
    np.testing.assert_allclose(s4[0], 0.821, rtol=1e-4)
    assert np.all(np.diff(s4) < 0) and s4[-1] > float(SDE.scaled_sigma(SDE.t_min))
    ts = consistency_times_of(SamplerConfig("consistency", steps=3, consistency_sigmas=(2.0, 0.5)), SDE)
    np.testing.assert_allclose(np.asarray(jax.vmap(SDE.scaled_sigma)(ts)), [2.0, 0.5], rtol=1e-4)
    with pytest.raises(ValueError, match="steps - 1"):
        consistency_times_of(SamplerConfig("consistency", steps=2, consistency_sigmas=(2.0, 0.5)), SDE)
    with pytest.raises(ValueError, match="decreasing"):
        consistency_times_of(SamplerConfig("consistency", steps=3, consistency_sigmas=(0.5, 2.0)), SDE)
    f = mlp_student(16, key=jr.key(0))
    for steps in (1, 2, 4):
        fn = build_sampler(SamplerConfig("consistency", steps=steps), f, N_FEAT)
        mol, nfe = fn(MASK, key=jr.key(1))
        assert int(nfe) == steps
        np.testing.assert_allclose(np.asarray(mol.positions).sum(0), 0.0, atol=1e-5)


def test_multistep_renoises_to_the_marginal():
    """Algorithm 1's re-noising of x (a state at t_min) to t: z = alpha(t) (x + sqrt(s^2 - s_min^2) eps), so
    z has the SDE's marginal noise sigma(t) on top of x's s_min. Seen through f(t, z) = z: the empirical
    per-coordinate std of z / alpha - x over the real features is sqrt(s^2 - s_min^2)."""
    t = consistency_times(SDE, 2)
    x = jax.tree.map(lambda a: a[0], DATA)
    identity = Scaled(1.0, SDE)

    def one(key):
        alpha = SDE.marginal(t[0])[0]
        return consistency_solve(identity, SDE, x, MASK, t, key=key).features / alpha - x.features

    diffs = np.asarray(jax.jit(jax.vmap(one))(jr.split(jr.key(3), 4000)))[:, :M]
    s, s_min = float(SDE.scaled_sigma(t[0])), float(SDE.scaled_sigma(SDE.t_min))
    np.testing.assert_allclose(diffs.std(), np.sqrt(s**2 - s_min**2), rtol=0.02)


# --- CD and CT against the exact oracle ------------------------------------------------------------------------
#
# Student: a depth-4 MLP under ConsistencyFunction with sigma_data = 1 (the toy positions' scale, 0.92; with
# sigma_data = 0.5 the fine noise levels are not learned in this budget). Loss: iCT's pseudo-Huber distance,
# 1 / (s_{n+1} - s_n) weighting and log-normal index (L2 / uniform learns the coarse levels first but not the
# fine ones, and a consistency sampler is only as good as its finest levels). Adam, learning rate decayed
# exponentially from 3e-3 by 300x; the final weights are sampled (an EMA of 0.999 lags too far behind in runs
# this short). TCM's stage 2 continues from that student on the intervals above s' = 0.16 with the same loss and
# the stage-1 student as the boundary (`tcm_stage_two`). Measured on this CPU (shared with another job) and
# reported by the tests' prints: see each docstring; experiments/consistency_oracle_sweep.py reruns any setting
# and experiments/NOTES.md holds the sweep's figures.


def train_student(
    objective, student, steps: int, *, with_target: bool, target_decay=None, batch: int = 128, lr: float = 3e-3,
    lr_decay: float = 300.0,
):  # fmt: skip
    """`steps` Adam steps on the K molecules tiled to `batch`, the learning rate decayed exponentially from `lr`
    by `lr_decay`; the final weights (`train.fit_tiled`)."""
    return fit_tiled(
        objective, student, DATA, MASK, steps=steps, batch=batch, lr=lr, lr_decay=lr_decay, key=jr.key(7),
        with_target=with_target, target_decay=target_decay,
    )  # fmt: skip


TRUNCATION = 0.16  # TCM's s': just above node 3 (s = 0.1512) of the N = 18 grid of EDM's VP schedule


def tcm_stage_two(
    objective, stage1, steps: int, *, lr: float, with_target: bool, n_points=None, boundary_fraction=None, **kw
):  # fmt: skip
    """TCM's stage 2 (Lee et al. 2025) on top of `stage1` (`truncated_loss` at s' = TRUNCATION; `n_points`:
    N(k), default the objective's; `boundary_fraction`: the share of draws on the boundary interval, None for
    uniform), trained from a copy of it. Returns the joined model."""
    stage2 = truncated_loss(objective, stage1, TRUNCATION, n_points=n_points, boundary_fraction=boundary_fraction)
    target_decay = (lambda k: 0.0) if with_target else None
    high = train_student(stage2, stage1, steps, with_target=with_target, target_decay=target_decay, lr=lr, **kw)
    return TruncatedConsistencyFunction(stage1, high, TRUNCATION)


def hit_rates(f) -> dict:
    """{steps: `oracle.Landing` of the 500 samples (fraction within 0.1 A of a molecule, hits per molecule,
    ...)} for 1, 2, 4 steps."""
    return {n: landing(consistency_positions(f, n), ORACLE) for n in (1, 2, 4)}


def balanced(hits: np.ndarray) -> bool:
    """Every molecule has at least 0.6 of its fair share (1 / K) of the samples that land: the K molecules are
    equally likely, and a consistency function whose basins have moved lands on them in the wrong proportions
    while still landing (what CT's absolute-distance fixed point does: experiments/ct_fixed_point_1d.py)."""
    return bool(hits.min() >= 0.6 * hits.sum() / K)


def _report(name, rates):
    parts = [f"{n} step(s) {r.within:.3f} within 0.1 A (per molecule {r.hits.tolist()})" for n, r in rates.items()]
    print(f"{name}: " + ", ".join(parts))


def cd_objective() -> ConsistencyLoss:
    """CD against the plain oracle (heun teacher, N = 18)."""
    return ConsistencyLoss(
        TeacherStep(ORACLE, solver_from_name("heun")),
        eqx.Partial(constant_n, n=18),
        PseudoHuberDistance(),
        InverseStepWeighting(),
        LogNormalIndex(),
    )


def ct_objective(steps: int) -> ConsistencyLoss:
    """CT on the oracle's K molecules (iCT: N(k) doubling from 11 to 161 over `steps`, no target model)."""
    return ConsistencyLoss(
        UnbiasedEstimator(),
        eqx.Partial(ict_n, total_steps=steps, s0=10, s1=160),
        PseudoHuberDistance(),
        InverseStepWeighting(),
        LogNormalIndex(),
    )


@pytest.fixture(scope="module")
def cd_stage1():
    """4000 CD steps (target = the student itself, mu = 0)."""
    student = mlp_student(512, key=jr.key(1), sigma_data=1.0, depth=4)
    return train_student(cd_objective(), student, 4000, with_target=True, target_decay=lambda k: 0.0)


@pytest.fixture(scope="module")
def ct_stage1():
    """4000 CT steps."""
    student = mlp_student(512, key=jr.key(1), sigma_data=1.0, depth=4)
    return train_student(ct_objective(4000), student, 4000, with_target=False)


@pytest.fixture(scope="module")
def cd_rates(cd_stage1):
    rates = hit_rates(cd_stage1)
    _report("CD", rates)
    return rates


@pytest.fixture(scope="module")
def ct_rates(ct_stage1):
    rates = hit_rates(ct_stage1)
    _report("CT", rates)
    return rates


@pytest.fixture(scope="module")
def tcm_cd_rates(cd_stage1):
    """TCM's stage 2 on the CD student: 3000 steps from learning rate 1e-3."""
    rates = hit_rates(tcm_stage_two(cd_objective(), cd_stage1, 3000, lr=1e-3, with_target=True))
    _report("TCM CD", rates)
    return rates


N161 = eqx.Partial(constant_n, n=161)  # CT's stage 2: constant at stage 1's last N (its curriculum would restart)


@pytest.fixture(scope="module")
def tcm_ct_rates(ct_stage1):
    """TCM's stage 2 on the CT student: 3000 steps from learning rate 1e-3 at stage 1's last N = 161, a quarter
    of the draws on the boundary interval (uniform draws put one in ~130 there and collapse: measured 0.0 at
    1 / 2 / 4 steps)."""
    stage = tcm_stage_two(
        ct_objective(4000), ct_stage1, 3000, lr=1e-3, with_target=False, n_points=N161, boundary_fraction=0.25
    )
    rates = hit_rates(stage)
    _report("TCM CT", rates)
    return rates


def test_cd_lands_on_the_oracle_in_few_steps(cd_rates):
    """4000 CD steps: the 4-step samples are within 0.1 A of one of the K molecules for >= 90 % and hit every
    molecule in about equal shares (`balanced`); 2 and 4 steps are at least as good as 1. Measured: 1 / 2 / 4
    steps 0.100 / 0.350 / 0.968, 4-step hits 140 / 134 / 115 / 95 (~50 s)."""
    assert cd_rates[4][0] >= 0.9 and np.all(cd_rates[4][1] > 0) and balanced(cd_rates[4][1])
    assert cd_rates[2][0] >= cd_rates[1][0] and cd_rates[4][0] >= cd_rates[1][0]


def test_ct_lands_on_the_oracle_in_few_steps(ct_rates):
    """4000 CT steps: the 4-step samples are within 0.1 A of a molecule for >= 80 % and hit every molecule in
    about equal shares; more steps are not worse than one. Measured: 1 / 2 / 4 steps 0.038 / 0.270 / 0.922, 4-step
    hits 130 / 125 / 112 / 94 (~45 s)."""
    assert ct_rates[4][0] >= 0.8 and np.all(ct_rates[4][1] > 0) and balanced(ct_rates[4][1])
    assert ct_rates[2][0] >= ct_rates[1][0] and ct_rates[4][0] >= ct_rates[1][0]


@pytest.mark.slow  # ~60 s more: CI time; the TCM mechanics keep their default tests above
def test_tcm_stage_two_lifts_the_one_step_cd_samples(cd_rates, tcm_cd_rates):
    """TCM's stage 2 (3000 more steps on the intervals above s' = 0.16, the stage-1 student as the boundary):
    the one-step samples within 0.1 A rise to >= 0.5 and by >= 0.3 over stage 1, covering all K; 2 and 4 steps
    stay at least as good as 1, 4 steps >= 0.9. Measured: 1 / 2 / 4 steps 0.650 / 0.770 / 0.974 (stage 1 0.100 /
    0.350 / 0.968; ~60 s more)."""
    tcm = tcm_cd_rates
    assert tcm[1][0] >= max(0.5, cd_rates[1][0] + 0.3) and np.all(tcm[1][1] > 0)
    assert tcm[2][0] >= tcm[1][0] and tcm[4][0] >= tcm[1][0] and tcm[4][0] >= 0.9


@pytest.mark.slow  # ~80 s
def test_tcm_stage_two_lifts_the_one_step_ct_samples(ct_rates, tcm_ct_rates):
    """The same for CT (3000 stage-2 steps at N = 161, boundary share 0.25): one-step rate up by >= 0.2 over
    stage 1, covering all K; 2 and 4 steps at least as good as 1, 4 steps >= 0.8. Measured: 1 / 2 / 4 steps
    0.372 / 0.468 / 0.948 (stage 1 0.038 / 0.270 / 0.922)."""
    tcm = tcm_ct_rates
    assert tcm[1][0] >= ct_rates[1][0] + 0.2 and np.all(tcm[1][1] > 0)
    assert tcm[2][0] >= tcm[1][0] and tcm[4][0] >= tcm[1][0] and tcm[4][0] >= 0.8


ONE_STEP_GAP = (
    "one-step CT lands 0.68 of the samples within 0.1 A (target 0.8), skewed between the molecules: the bias of "
    "pseudo-Huber CT's fixed point, not the student (experiments/NOTES.md, 'One-step CT against the toy oracle')"
)


@pytest.fixture(scope="module")
def long_tcm_cd_rates():
    """The issue's one-step CD setting: batch 256 in both stages, 24000 stage-2 steps from lr 3e-3 (~18 CPU-min)."""
    student = mlp_student(512, key=jr.key(1), sigma_data=1.0, depth=4)
    stage1 = train_student(cd_objective(), student, 4000, with_target=True, target_decay=lambda k: 0.0, batch=256)
    rates = hit_rates(tcm_stage_two(cd_objective(), stage1, 24000, lr=3e-3, with_target=True, batch=256))
    _report("TCM CD, batch 256, 24000 stage-2 steps", rates)
    return rates


@pytest.fixture(scope="module")
def long_tcm_ct_rates(ct_stage1):
    """The best one-step CT setting measured: 24000 stage-2 steps from lr 3e-3 at N = 161, boundary share 0.25."""
    stage = tcm_stage_two(
        ct_objective(4000), ct_stage1, 24000, lr=3e-3, with_target=False, n_points=N161, boundary_fraction=0.25
    )
    rates = hit_rates(stage)
    _report("TCM CT, 24000 stage-2 steps", rates)
    return rates


@pytest.mark.slow
def test_cd_one_step_lands_on_the_oracle(long_tcm_cd_rates):
    """The issue's target: ONE-step CD samples within 0.1 A of a molecule for >= 90 %, covering all K in about
    equal shares (`balanced`), with 2 and 4 steps at least as good. Measured: 1 / 2 / 4 steps 0.912 / 0.982 /
    0.962 (per molecule 106 / 118 / 116 / 116 at one step; median 0.022 A, 90 % quantile 0.084 A)."""
    rates = long_tcm_cd_rates
    assert rates[1][0] >= 0.9 and np.all(rates[1][1] > 0) and balanced(rates[1][1])
    assert rates[2][0] >= rates[1][0] and rates[4][0] >= rates[1][0]


@pytest.mark.slow
@pytest.mark.xfail(reason=ONE_STEP_GAP, strict=False)
def test_ct_one_step_lands_on_the_oracle(long_tcm_ct_rates):
    """The issue's target: ONE-step CT samples within 0.1 A of a molecule for >= 80 %, in about equal shares."""
    rates = long_tcm_ct_rates
    assert rates[1][0] >= 0.8 and balanced(rates[1][1]) and rates[2][0] >= rates[1][0] and rates[4][0] >= rates[1][0]


@pytest.mark.slow
@pytest.mark.xfail(
    reason="an EGNN student needs far more than a CPU-test budget: it does not even learn the denoiser of the "
    "rotated molecules in one (experiments/NOTES.md, 'EGNN students against the rotation-augmented oracle')",
    strict=False,
)
def test_egnn_cd_against_the_rotation_augmented_oracle():
    """CD of an EGNN consistency function against the oracle of the K molecules under 32 fixed random rotations
    and reflections (approximately E(3)-invariant data): samples are scored by their RMSD to the nearest of the
    K molecules after the optimal rotation or reflection (Kabsch). Target: 4-step samples within 0.1 A for
    >= 80 %, covering all K; more steps not worse than one."""
    teacher = rotation_augmented(DATA, MASK, SDE, 32, key=jr.key(5), reflect=True)
    objective = ConsistencyLoss(
        TeacherStep(teacher, solver_from_name("heun")),
        eqx.Partial(constant_n, n=18),
        PseudoHuberDistance(),
        InverseStepWeighting(),
        LogNormalIndex(),
    )
    student = ConsistencyFunction(EGNN(N_FEAT, 64, 4, key=jr.key(1)), SDE, sigma_data=1.0)
    steps, batch = 6000, 64
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(),
        optax.scale_by_schedule(lambda c: -1e-3 * (1.0 / 300.0) ** (c / steps)),
    )
    state = init_state(student, optimizer, with_target=True)
    step = make_step(objective, optimizer, ema_decay=0.0, target_decay=lambda k: 0.0, max_traces=1)
    masks, weights = jnp.broadcast_to(MASK, (batch, CAPACITY)), jnp.ones(batch)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        rows = rng.integers(0, teacher.data.positions.shape[0], batch)
        mols = Molecule(teacher.data.positions[rows], teacher.data.features[rows])
        state, _ = step(state, mols, masks, weights, jr.key(7))
    data = np.asarray(DATA.positions)[:, :M]
    rates = {}
    for n in (1, 2, 4):
        samples = consistency_positions(state.model, n, SAMPLE_KEYS[:200])
        d = np.array([[kabsch_rmsd(p - p.mean(0), x) for x in data] for p in samples])
        near = d.min(1)
        rates[n] = (float(np.mean(near < 0.1)), np.bincount(d.argmin(1)[near < 0.1], minlength=K))
        print(f"EGNN CD {n} step(s): {rates[n][0]:.3f} within 0.1 A after alignment, median {np.median(near):.3f} A")
    assert rates[4][0] >= 0.8 and np.all(rates[4][1] > 0)
    assert rates[2][0] >= rates[1][0] and rates[4][0] >= rates[1][0]
