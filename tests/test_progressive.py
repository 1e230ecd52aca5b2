"""Progressive distillation against the exact oracle (CPU): the target inverts the DDIM step, the DDPM teacher
step is EDM's ancestral step, the halving schedule is traced (one compilation for every round), one round
reproduces the teacher's samples from the same noise, and after several rounds a 4-step student still lands
on the oracle's molecules.

Students are small MLPs (`nn.MLPNet`) under Karras preconditioning: the plain oracle is not rotation-invariant,
so an equivariant student could not represent it. Molecules: K = 3 toy molecules of 7 atoms (9 slots); their
pairwise RMSDs are above 1 A, so "within 0.1 A" of a molecule means "on that molecule".
"""

import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from sde_mol.data.fixed import tiled_batch, toy_oracle
from sde_mol.data.loader import Batch
from sde_mol.denoisers import AbstractX0Denoiser, KarrasDenoiser
from sde_mol.molecule import Molecule, com_free_normal
from sde_mol.nn.egnn import MLPNet
from sde_mol.objectives.progressive import HalvingSchedule, LevelledState, ProgressiveDistillation, ddim_target
from sde_mol.oracle import nearest
from sde_mol.run.progressive import TrajectoryConfig, round_batches
from sde_mol.samplers import DDIM, ancestral_step, ddim_step
from sde_mol.sde import AbstractSDE, DiscreteVPSDE, PolynomialVPSDE
from sde_mol.training.state import init_state, make_step

K, M, CAPACITY, N_FEAT = 3, 7, 9, 6
SDE = DiscreteVPSDE.edm_polynomial()
ORACLE = toy_oracle(SDE, n_molecules=K, n_atoms=M, capacity=CAPACITY)
DATA, MASK = ORACLE.data, ORACLE.mask
SAMPLE_KEYS = jr.split(jr.key(99), 500)


# --- helpers -----------------------------------------------------------------------------------------------


def mlp_student(hidden: int, *, key) -> KarrasDenoiser:
    """A Karras-preconditioned MLP student."""
    return KarrasDenoiser(MLPNet(CAPACITY, N_FEAT, hidden, 3, key=key), SDE, sigma_data=1.0)


def per_round_decay(lr: float, steps_per_round: int) -> optax.GradientTransformation:
    """Adam with Salimans & Ho's learning rate, decayed linearly to 0 within each round."""
    return optax.chain(
        optax.scale_by_adam(), optax.scale_by_schedule(lambda c: -lr * (1.0 - (c % steps_per_round) / steps_per_round))
    )


def distil(
    schedule,
    student,
    *,
    teacher=ORACLE,
    teacher_eta=0.0,
    student_eta=0.0,
    teacher_noise=True,
    lr=3e-3,
    batch=64,
    seed=7,
):
    """Run every round; returns (the student after each round, the step function)."""
    objective = ProgressiveDistillation(
        SDE, schedule, teacher, teacher_eta=teacher_eta, student_eta=student_eta, teacher_noise=teacher_noise
    )
    optimizer = per_round_decay(lr, schedule.steps_per_round)
    state = init_state(student, optimizer, with_target=True)
    step = make_step(objective, optimizer, ema_decay=0.0, target_decay=schedule.target_decay, max_traces=1)
    (mols, masks, weights), key = tiled_batch(DATA, MASK, batch), jr.key(seed)
    students = []
    for _ in range(schedule.n_rounds):
        for _ in range(schedule.steps_per_round):
            state, aux = step(state, mols, masks, weights, key)
        students.append(state.model)
    return students, step


def ddim_positions(den, n_steps: int, eta: float = 0.0):
    """Positions of DDIM samples; sample i starts from the prior noise of SAMPLE_KEYS[i] whatever n_steps is."""
    fn = jax.vmap(lambda k: DDIM(n_steps, eta=eta)(den, MASK, N_FEAT, key=k)[0].positions)
    return np.asarray(jax.jit(fn)(SAMPLE_KEYS))[:, :M]


def nearest_rmsd(positions):
    """RMSD of each sample to its nearest oracle molecule (same frame, no rotation search)."""
    return nearest(positions, ORACLE)[0]


def pair_rmsd(a, b):
    return np.sqrt(((a - b) ** 2).sum(-1).mean(-1))


class FixedX0(AbstractX0Denoiser):
    value: Molecule
    sde: AbstractSDE

    def __call__(self, t, z, mask):
        return self.value


# --- exact properties ----------------------------------------------------------------------------------------


def test_toy_molecules_are_far_apart():
    x = np.asarray(DATA.positions)[:, :M]
    d = pair_rmsd(x[:, None], x[None])
    assert d[~np.eye(K, dtype=bool)].min() > 1.0


@pytest.mark.parametrize("sde", [SDE, PolynomialVPSDE()], ids=["edm_discrete", "polynomial"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_target_inverts_the_ddim_step(sde, eta):
    """One DDIM(eta) step with x0 = x~ from z_t has mean z_s exactly when x~ = ddim_target(z_t, z_s); for
    eta = 1 the mean is the DDPM posterior mean alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma^2_{t|s} /
    sigma_t^2 x0."""
    x = jax.tree.map(lambda a: a[1], DATA)
    t, s = jnp.float32(0.625), jnp.float32(0.5)
    z_t = sde.perturb(jax.tree.map(lambda a: a[0], DATA), MASK, t, key=jr.key(1))[0]
    key = jr.key(2)
    z_s = ddim_step(FixedX0(x, sde), sde, s, t, z_t, MASK, eta=eta, key=key)
    alpha_ts, sigma2_ts = sde.transition(s, t)
    (alpha_s, sigma_s), (_, sigma_t) = sde.marginal(s), sde.marginal(t)
    mean = z_s - eta * jnp.sqrt(sigma2_ts) * sigma_s / sigma_t * com_free_normal(key, MASK, N_FEAT)
    if eta == 1.0:
        posterior = alpha_ts * sigma_s**2 / sigma_t**2 * z_t + alpha_s * sigma2_ts / sigma_t**2 * x
        np.testing.assert_allclose(mean.positions, posterior.positions, atol=2e-6)
    recovered = ddim_target(sde, t, s, z_t, mean, eta)
    np.testing.assert_allclose(recovered.positions, x.positions, atol=2e-5)
    np.testing.assert_allclose(recovered.features, x.features, atol=2e-5)


def test_ddpm_teacher_step_is_edm_ancestral_step():
    """The stochastic teacher (DDIM with eta = 1) is EDM's p(z_s | z_t), noise for noise."""
    z_t = SDE.perturb(jax.tree.map(lambda a: a[2], DATA), MASK, 0.4, key=jr.key(3))[0]
    for s, t in [(0.375, 0.4), (0.1, 0.35), (0.0, 0.125)]:
        key = jr.key(int(1000 * t))
        ddpm = ddim_step(ORACLE, SDE, s, t, z_t, MASK, eta=1.0, key=key)
        edm = ancestral_step(ORACLE, SDE, s, t, z_t, MASK, com_free_normal(key, MASK, N_FEAT))
        np.testing.assert_allclose(ddpm.positions, edm.positions, atol=1e-5)
        np.testing.assert_allclose(ddpm.features, edm.features, atol=1e-5)


def test_halving_schedule():
    sched = HalvingSchedule(n_teacher=64, steps_per_round=10, n_rounds=3)
    steps = jnp.arange(40)
    n = jax.vmap(sched.student_steps)(steps)
    np.testing.assert_array_equal(n, [32] * 10 + [16] * 10 + [8] * 20)  # clipped to the last round
    decay = jax.vmap(sched.target_decay)(steps)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(decay) == 0.0), [9, 19, 29, 39])
    assert [sched.steps_of_round(r) for r in range(3)] == [32, 16, 8]
    with pytest.raises(ValueError, match="divisible by 2\\^n_rounds"):
        HalvingSchedule(n_teacher=12, steps_per_round=10, n_rounds=3)
    with pytest.raises(ValueError, match="must be >= 1"):
        HalvingSchedule(n_teacher=8, steps_per_round=0, n_rounds=1)
    with pytest.raises(ValueError, match="teacher_eta"):
        ProgressiveDistillation(SDE, sched, ORACLE, teacher_eta=2.0)


def test_one_compilation_serves_every_round():
    """N halves and the teacher is replaced by the student at every round boundary, inside ONE compiled step:
    the step counts, the target copies and the traced N are all checked."""
    sched = HalvingSchedule(n_teacher=16, steps_per_round=3, n_rounds=3)
    objective = ProgressiveDistillation(SDE, sched, ORACLE)
    optimizer = optax.adam(1e-3)
    state = init_state(mlp_student(16, key=jr.key(1)), optimizer, with_target=True)
    step = make_step(objective, optimizer, ema_decay=0.0, target_decay=sched.target_decay, max_traces=1)
    mols, masks, weights = tiled_batch(DATA, MASK, 2 * K)
    seen_n = []
    for k in range(9):
        before = state.target_model
        state, aux = step(state, mols, masks, weights, jr.key(0))
        seen_n.append(int(aux["student_steps"]))
        w_model = state.model.net.mlp.layers[0].weight
        w_target = state.target_model.net.mlp.layers[0].weight
        if (k + 1) % 3 == 0:  # round end: the student becomes the teacher
            np.testing.assert_array_equal(w_target, w_model)
        else:
            np.testing.assert_array_equal(w_target, before.net.mlp.layers[0].weight)
            assert not np.array_equal(w_target, w_model)
        assert np.isfinite(float(aux["loss"]))
    assert seen_n == [8, 8, 8, 4, 4, 4, 2, 2, 2]
    assert step.num_traces() == 1


def test_eps_taper_of_the_weight_only_below_its_snr():
    """`eps_below_snr` = s0: Salimans & Ho's max(SNR, 1) where SNR >= s0; below it SNR / s0, so the loss is the
    eps error / s0 (x0 error = eps error / sqrt(SNR) for an eps student); continuous at s0; 0 = no taper."""
    sde, s0 = PolynomialVPSDE(), 0.01
    t = jnp.linspace(0.0, 1.0, 401)
    snr = np.exp(np.asarray(jax.vmap(sde.logsnr)(t), np.float64))
    plain = ProgressiveDistillation(sde, HalvingSchedule(8, 1, 1))
    tapered = ProgressiveDistillation(sde, HalvingSchedule(8, 1, 1), eps_below_snr=s0)
    w_plain = np.asarray(jax.vmap(plain.weight)(t))
    w_tapered = np.asarray(jax.vmap(tapered.weight)(t))
    np.testing.assert_allclose(w_plain, np.maximum(snr, 1.0), rtol=1e-5)
    low = snr < s0
    assert 0 < low.sum() < 40  # only the top of EDM's schedule (t ~ 0.95-1)
    np.testing.assert_allclose(w_tapered[~low], w_plain[~low], rtol=1e-6)
    np.testing.assert_allclose(w_tapered[low], snr[low] / s0, rtol=1e-4)
    assert w_tapered[-1] < 2e-3  # t = 1: SNR = 1e-5
    # an eps error e at t = 1 costs e^2 / s0 under the taper, e^2 / SNR (~1e5 x more) without it
    alpha, sigma = sde.marginal(1.0)
    assert float(tapered.weight(1.0) * (sigma / alpha) ** 2) == pytest.approx(1 / s0, rel=1e-3)
    with pytest.raises(ValueError, match="eps_below_snr"):
        ProgressiveDistillation(sde, HalvingSchedule(8, 1, 1), eps_below_snr=-1.0)


def test_missing_teacher_is_a_clear_error():
    objective = ProgressiveDistillation(SDE, HalvingSchedule(8, 1, 1))
    x = jax.tree.map(lambda a: a[0], DATA)
    with pytest.raises(ValueError, match="no teacher"):
        objective.loss_one(mlp_student(8, key=jr.key(0)), x, MASK, key=jr.key(1), step=0)


# --- distillation against the oracle ----------------------------------------------------------------------------


def test_one_round_reproduces_the_teacher():
    """A 16-step DDIM teacher (the exact oracle) distilled once: the student's 8-step DDIM sample from the same
    prior noise is within 0.1 A RMSD of the teacher's 16-step sample for >= 90 % of the noises (median < 0.05
    A). Why not all: the teacher's flow map is discontinuous where trajectories split between molecules, and a
    smooth student routes the few noises next to those boundaries to the neighbouring molecule. Measured:
    ~94 % within 0.1 A, median ~0.026 A (2000 steps)."""
    (student,), step = distil(HalvingSchedule(16, 2000, 1), mlp_student(512, key=jr.key(1)))
    teacher_samples = ddim_positions(ORACLE, 16)
    assert np.all(nearest_rmsd(teacher_samples) < 1e-3)  # the teacher itself lands on the data
    d = pair_rmsd(ddim_positions(student, 8), teacher_samples)
    print(f"one round 16 -> 8: within 0.1 A of the teacher {np.mean(d < 0.1):.3f}, median {np.median(d):.4f} A")
    assert np.mean(d < 0.1) >= 0.9 and np.median(d) < 0.05
    assert step.num_traces() == 1


@pytest.mark.slow
def test_rounds_keep_hitting_the_oracle():
    """32 -> 16 -> 8 -> 4 steps in three rounds (one compilation): at every round the student follows its
    teacher (the previous student) and lands on the oracle's molecules; at 4 steps >= 90 % of samples are
    within 0.1 A of a molecule. Measured: hits 0.98 / 0.97 / 0.95."""
    students, step = distil(HalvingSchedule(32, 3000, 3), mlp_student(512, key=jr.key(1)))
    teacher = ddim_positions(ORACLE, 32)
    for r, student in enumerate(students):
        n = 16 >> r
        cur = ddim_positions(student, n)
        hits = np.mean(nearest_rmsd(cur) < 0.1)
        follow = np.mean(pair_rmsd(cur, teacher) < 0.1)
        print(f"round {r}: {n} steps, hits {hits:.3f}, within 0.1 A of the teacher's sample {follow:.3f}")
        assert follow >= 0.9 and hits >= 0.9
        teacher = cur
    assert step.num_traces() == 1


@pytest.mark.slow
def test_ddpm_teacher_needs_an_ancestral_student():
    """The stochastic (DDPM) teacher, one round 16 -> 8.

    * Target solved for the student's ancestral step (student_eta = 1) and the student sampled ancestrally
      (DDIM eta = 1): the first moment of the teacher's two-step transition is matched (for a fixed x0 two
      posterior steps compose to one), so the student lands on the data: hits >= 0.6 (measured 0.87; the
      target's variance grows like N, so it learns more slowly than the DDIM student).
    * Target solved as if the student step were deterministic (student_eta = 0, our reading of Lacombe &
      Vaidya) with a deterministic student: the expected target is the mean of the stochastic transition, in
      the small-step limit 2 x_hat - z / alpha, so the student follows the reverse SDE's drift without its
      noise and over-denoises into averages of molecules: hits <= 0.2 (measured ~0.0)."""
    (ancestral,), _ = distil(
        HalvingSchedule(16, 3000, 1), mlp_student(512, key=jr.key(1)), teacher_eta=1.0, student_eta=1.0
    )
    hits = np.mean(nearest_rmsd(ddim_positions(ancestral, 8, eta=1.0)) < 0.1)
    (literal,), _ = distil(HalvingSchedule(16, 3000, 1), mlp_student(512, key=jr.key(1)), teacher_eta=1.0)
    hits_literal = np.mean(nearest_rmsd(ddim_positions(literal, 8)) < 0.1)
    print(
        f"DDPM teacher 16 -> 8: ancestral student hits {hits:.3f}; deterministic-solve student hits {hits_literal:.3f}"
    )
    assert hits >= 0.6 and hits_literal <= 0.2


def test_ddim_step_without_noise_is_the_steps_mean():
    """`ddim_step(..., noise=False)` is the mean of the stochastic step (Monte Carlo over 4000 draws, within 4
    standard errors), and for eta = 1 it differs from the deterministic (eta = 0) step."""
    x0 = jax.tree.map(lambda a: a[0], DATA)
    z = SDE.prior(MASK, N_FEAT, key=jr.key(4))
    den = FixedX0(x0, SDE)
    mean = ddim_step(den, SDE, 0.4, 0.6, z, MASK, eta=1.0, key=jr.key(0), noise=False)
    draws = jax.vmap(lambda k: ddim_step(den, SDE, 0.4, 0.6, z, MASK, eta=1.0, key=k).positions)(
        jr.split(jr.key(1), 4000)
    )
    m = MASK[:, None]
    se = np.asarray(draws.std(0)) / np.sqrt(4000)
    assert np.all(np.abs(np.asarray(draws.mean(0)) - np.asarray(mean.positions)) <= 4 * se + 1e-6)
    ddim = ddim_step(den, SDE, 0.4, 0.6, z, MASK, eta=0.0, key=jr.key(0))
    assert float(jnp.max(jnp.where(m, jnp.abs(ddim.positions - mean.positions), 0.0))) > 1e-2


@pytest.mark.slow
def test_mean_path_ddpm_student_lands_on_the_data():
    """The mean-path target (DDPM teacher steps without their noise, target solved for the student's ancestral
    step, student sampled with DDIM eta = 1), one round 16 -> 8: without the target's variance the student lands
    on the oracle's molecules as often as the DDIM student does (hits >= 0.9; measured 0.990, against 0.87 for
    the noisy DDPM target of `test_ddpm_teacher_needs_an_ancestral_student`)."""
    (student,), _ = distil(
        HalvingSchedule(16, 3000, 1), mlp_student(512, key=jr.key(1)), teacher_eta=1.0, student_eta=1.0,
        teacher_noise=False,
    )  # fmt: skip
    hits = np.mean(nearest_rmsd(ddim_positions(student, 8, eta=1.0)) < 0.1)
    print(f"DDPM mean-path teacher 16 -> 8: ancestral student hits {hits:.3f}")
    assert hits >= 0.9


# --- trajectory states -------------------------------------------------------------------------------------------


def test_teacher_trajectory_is_the_teachers_ddim_chain():
    """`teacher_trajectory(teacher, n)` holds the 2n-step teacher's own DDIM chain from the prior at the student's
    levels n, ..., 1: entry k equals DDIM over the first 2k steps of the 2n-step grid from the same prior."""
    n, objective = 4, ProgressiveDistillation(SDE, HalvingSchedule(8, 1, 1), ORACLE)
    key = jr.key(3)
    states = objective.teacher_trajectory(ORACLE, n, MASK, N_FEAT, key=key)
    assert states.positions.shape == (n, CAPACITY, 3)
    z = SDE.prior(MASK, N_FEAT, key=jr.split(key)[0])
    ts = jnp.arange(2 * n, -1, -1) / (2 * n)
    for k in range(n):
        np.testing.assert_allclose(states.positions[k], z.positions, atol=1e-5)
        np.testing.assert_allclose(states.features[k], z.features, atol=1e-5)
        for s in range(2):
            z = ddim_step(ORACLE, SDE, ts[2 * k + s + 1], ts[2 * k + s], z, MASK, eta=0.0, key=jr.key(0))


def test_levelled_state_is_distilled_where_it_stands():
    """A `LevelledState` (z at student level i) is distilled at z itself: with a deterministic teacher, the loss
    is weight(t_i) ||x_hat(t_i, z) - x~||^2 / dim, with x~ the DDIM target towards the chain's next state (the
    teacher's two steps from a chain state ARE the next chain state)."""
    n = 4
    objective = ProgressiveDistillation(SDE, HalvingSchedule(2 * n, 10, 1), ORACLE)
    states = objective.teacher_trajectory(ORACLE, n, MASK, N_FEAT, key=jr.key(5))
    student = mlp_student(16, key=jr.key(2))
    dim = (M - 1) * 3 + M * N_FEAT
    for k in range(n - 1):
        level = n - k
        z, z_next = (jax.tree.map(lambda a, j=j: a[j], states) for j in (k, k + 1))
        row = LevelledState(z, jnp.int32(level))
        loss, aux = objective.loss_one(student, row, MASK, key=jr.key(k), step=0)
        t, t_end = level / n, (level - 1) / n
        assert float(aux["t"]) == pytest.approx(t)
        target = ddim_target(SDE, t, t_end, z, z_next)
        x_hat = student(t, z, MASK)
        m = MASK[:, None]
        err = jnp.sum(jnp.where(m, (x_hat.positions - target.positions) ** 2, 0.0))
        err += jnp.sum(jnp.where(m, (x_hat.features - target.features) ** 2, 0.0))
        expected = objective.weight(t) * err / dim
        assert float(loss) == pytest.approx(float(expected), rel=2e-3)


def test_round_batches_mix_chain_states_in_exactly_and_resume():
    """`round_batches` with fraction 1/2: every other step of a round is a batch of chain states (levels in 1..N,
    `reuse` distinct levels per row per generated batch), the rest are the data batches of those steps; a stream
    started mid-round (a resume) yields exactly the tail of the uninterrupted one."""
    n, reuse, start = 4, 2, 100
    objective = ProgressiveDistillation(SDE, HalvingSchedule(2 * n, 10, 1), ORACLE)
    mols, masks, weights = tiled_batch(DATA, MASK, 4)

    def data(k0):
        for k in itertools.count(k0):
            yield Batch(np.asarray(mols.positions) + k, np.asarray(mols.features), np.asarray(masks),
                        np.full(4, M, np.int32), np.asarray(weights))  # fmt: skip

    cfg = TrajectoryConfig(fraction=0.5, reuse=reuse)
    stream = round_batches(data, objective, ORACLE, cfg, n_steps=n, round_start=start, n_feat=N_FEAT, seed=0)
    full = list(itertools.islice(stream(start), 12))
    levels = []
    for k, b in enumerate(full):
        if k % 2 == 0:  # floor((k + 1) / 2) == floor(k / 2): a data step, the data batch of that step
            assert isinstance(b, Batch) and float(b.positions[0, 0, 0] - mols.positions[0, 0, 0]) == start + k
        else:
            state, bm, bw = b
            assert isinstance(state, LevelledState) and state.z.positions.shape == (4, CAPACITY, 3)
            np.testing.assert_array_equal(bm, masks)
            levels.append(np.asarray(state.level))
    levels = np.stack(levels)  # (6 chain batches, 4 rows): batches 2g, 2g + 1 come from generated batch g
    assert levels.min() >= 1 and levels.max() <= n
    for g in range(3):
        assert np.all(levels[2 * g] != levels[2 * g + 1])
    tail = list(itertools.islice(stream(start + 5), 7))
    for a, b in zip(full[5:], tail, strict=True):
        if isinstance(a, Batch):
            np.testing.assert_array_equal(a.positions, b.positions)
        else:
            np.testing.assert_array_equal(a[0].level, b[0].level)
            np.testing.assert_allclose(a[0].z.positions, b[0].z.positions, atol=1e-6)
    assert round_batches(data, objective, ORACLE, TrajectoryConfig(), n_steps=n, round_start=0, n_feat=N_FEAT,
                         seed=0) is data  # fmt: skip
    with pytest.raises(ValueError, match="--trajectory.fraction"):
        round_batches(data, objective, ORACLE, TrajectoryConfig(fraction=1.5), n_steps=n, round_start=0,
                      n_feat=N_FEAT, seed=0)  # fmt: skip
