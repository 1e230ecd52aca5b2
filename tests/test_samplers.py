"""Samplers: EDM fixture parity of one ancestral step and of the final decode; every sampler lands on the K
molecules of an exact oracle with equal frequencies; manual teacher step == diffeqsolve; NFE counts;
batch-size independence of `sample_molecules`."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from sde_mol.data.qm9 import EDM_TRAIN_SIZE_COUNTS, DatasetInfo
from sde_mol.denoisers import AbstractDenoiser, AbstractX0Denoiser, eps_to_x0
from sde_mol.molecule import Molecule
from sde_mol.oracle import GaussianOracle, OracleDenoiser, toy_molecules
from sde_mol.run.build import solver_from_name
from sde_mol.samplers import (
    DDIM,
    PFODE,
    Ancestral,
    ReverseSDE,
    ancestral_mean_std,
    ancestral_step,
    capacities,
    ddim_solve,
    decode,
    draw_sizes,
    edm_final_decode,
    pf_ode_solve,
    reverse_sde_solve,
    sample_molecules,
)
from sde_mol.schedules import time_grid
from sde_mol.sde import AbstractSDE, DiscreteVPSDE, KarrasSDE
from sde_mol.terms import pf_ode_term, teacher_step

EDM = DiscreteVPSDE.edm_polynomial()
INFO = DatasetInfo(size_counts=tuple(EDM_TRAIN_SIZE_COUNTS.get(m, 0) for m in range(30)))


class FixedEps(AbstractDenoiser):
    """Stub network output: returns a given eps_hat (the fixture's), x0 from it."""

    value: Molecule
    sde: AbstractSDE

    def eps(self, t, z, mask):
        return self.value

    def __call__(self, t, z, mask):
        alpha, sigma = self.sde.marginal(t)
        return eps_to_x0(self.value, z, alpha, sigma)


def _mol(array, b):
    return Molecule.from_array(jnp.asarray(array[b]))


def _mask(d, b):
    return jnp.asarray(d["node_mask"][b, :, 0] > 0)


# --- EDM fixture parity ----------------------------------------------------------------------------------


def test_ancestral_step_parity(fixture_npz):
    d = fixture_npz
    for b in range(3):
        # EDM's t_int / T as a correctly rounded float32 division (numpy), then a 0-d jax array
        s = jnp.asarray(np.float32(d["anc_s"][b]) / np.float32(1000))
        t = jnp.asarray(np.float32(d["anc_t"][b]) / np.float32(1000))
        stub = FixedEps(_mol(d["anc_eps_hat"], b), EDM)
        mask, z_t = _mask(d, b), _mol(d["anc_zt"], b)
        mu, std = ancestral_mean_std(stub, EDM, s, t, z_t, mask)
        np.testing.assert_allclose(mu.to_array(), d["anc_mu"][b], rtol=0, atol=1e-5)
        np.testing.assert_allclose(std, d["anc_sigma"][b], rtol=1e-5)
        z_s = ancestral_step(stub, EDM, s, t, z_t, mask, _mol(d["anc_noise"], b))
        np.testing.assert_allclose(z_s.to_array(), d["anc_zs"][b], rtol=0, atol=1e-5)


def test_final_decode_parity(fixture_npz):
    d = fixture_npz
    np.testing.assert_allclose(EDM.scaled_sigma(0.0), d["dec_sigma_x"], rtol=1e-6)
    for b in range(3):
        stub = FixedEps(_mol(d["dec_eps_hat"], b), EDM)
        mask, z0 = _mask(d, b), _mol(d["dec_z0"], b)
        np.testing.assert_allclose(stub(0.0, z0, mask).to_array(), d["dec_mu"][b], rtol=0, atol=1e-5)
        out = edm_final_decode(stub, EDM, 0.0, z0, mask, _mol(d["dec_noise"], b))
        np.testing.assert_allclose(out.positions, d["dec_x"][b], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(out.features, z0.features)  # features come from z_0 itself
        positions, types, charges = decode(out, mask, INFO)
        np.testing.assert_allclose(positions, d["dec_x"][b], rtol=0, atol=1e-5)
        one_hot = np.where(np.asarray(mask)[:, None], np.eye(5)[np.maximum(np.asarray(types), 0)], 0)
        np.testing.assert_array_equal(one_hot, d["dec_one_hot"][b])
        np.testing.assert_array_equal(charges, d["dec_charges"][b, :, 0].astype(np.int32))
        assert np.all(np.asarray(types)[~np.asarray(mask)] == -1)


# --- oracle samplers -------------------------------------------------------------------------------------

K, M, CAPACITY, N_SAMPLES = 5, 7, 9, 300
DATA, MASK = toy_molecules(jr.key(0), K, M, CAPACITY)
# chi-square with K - 1 = 4 degrees of freedom: P(chi2 > 18.47) = 0.001 under equal frequencies
CHI2_4DOF_P001 = 18.47
SDE_GRID = {"edm_vp": (EDM, "uniform"), "karras": (KarrasSDE(), "karras")}

SAMPLERS = {
    "ancestral_1000": lambda grid: Ancestral(1000, grid=grid),
    "ddim_100": lambda grid: DDIM(100, grid=grid),
    "pf_ode_heun_50": lambda grid: PFODE(dfx.Heun(), 50, grid=grid),
    "pf_ode_dopri5_adaptive": lambda grid: PFODE(dfx.Dopri5(), grid=grid, adaptive=True),
    "reverse_sde_500": lambda grid: ReverseSDE(500, grid=grid),
}


def _rmsd_to_data(positions):
    """(n, K) RMSD over the real atoms, positions as they are (no rotation search)."""
    x = np.asarray(DATA.positions)[:, :M]
    p = np.asarray(positions)[:, :M]
    return np.sqrt(((p[:, None] - x[None]) ** 2).sum(-1).mean(-1))


def _check_hits(rmsd, label):
    best, nearest = rmsd.argmin(1), rmsd.min(1)
    within = nearest < 0.05
    counts = np.bincount(best[within], minlength=K)
    expected = within.sum() / K
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    print(f"{label}: within 0.05 A {within.mean():.3f}, counts {counts.tolist()}, chi2 {chi2:.2f}")
    assert within.mean() >= 0.99, (label, within.mean())
    assert np.all(counts > 0) and chi2 < CHI2_4DOF_P001, (label, counts, chi2)


@pytest.mark.parametrize("sde_name", list(SDE_GRID))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_oracle_sampler_lands_on_data(sampler, sde_name):
    sde, grid = SDE_GRID[sde_name]
    oracle = OracleDenoiser(DATA, MASK, sde)
    fn = SAMPLERS[sampler](grid)
    mols, nfe = jax.jit(jax.vmap(lambda k: fn(oracle, MASK, 6, key=k)))(jr.split(jr.key(1), N_SAMPLES))
    assert mols.positions.shape == (N_SAMPLES, CAPACITY, 3)
    assert float(jnp.max(jnp.abs(mols.positions[:, M:]))) == 0.0
    _check_hits(_rmsd_to_data(mols.positions), f"{sampler}/{sde_name} (nfe {int(nfe[0])})")


@pytest.mark.parametrize("sde_name", ["edm_vp", pytest.param("karras", marks=pytest.mark.slow)])
def test_oracle_solvers_arrive_before_the_final_denoise(sde_name):
    """The state z(t_min) itself is within 0.05 A of alpha(t_min) x_k (the final denoiser call, which snaps
    onto the nearest molecule, is not what makes the samplers land)."""
    sde, grid = SDE_GRID[sde_name]
    oracle = OracleDenoiser(DATA, MASK, sde)
    alpha, _ = sde.marginal(sde.t_min)
    solves = {
        "ddim": lambda z, k: ddim_solve(oracle, sde, z, MASK, time_grid(sde, 100, grid), key=k),
        "pf_ode_heun": lambda z, k: pf_ode_solve(oracle, sde, z, MASK, time_grid(sde, 50, grid), solver=dfx.Heun())[0],
        "pf_ode_dopri5": lambda z, k: pf_ode_solve(
            oracle, sde, z, MASK, time_grid(sde, 50, grid), solver=dfx.Dopri5(), adaptive=True
        )[0],
        "reverse_sde": lambda z, k: reverse_sde_solve(oracle, sde, z, MASK, time_grid(sde, 500, grid), key=k),
    }

    def run_all(key):
        k0, k1 = jr.split(key)
        z = sde.prior(MASK, 6, key=k0)
        return {name: solve(z, k1) for name, solve in solves.items()}

    out = jax.jit(jax.vmap(run_all))(jr.split(jr.key(2), 200))
    for name, z in out.items():
        _check_hits(_rmsd_to_data(z.positions / alpha), f"z(t_min) {name}/{sde_name}")


# --- manual teacher step vs diffeqsolve ------------------------------------------------------------------


@pytest.mark.parametrize("solver_name", ["euler", "heun", "midpoint", "tsit5", "dopri5"])
def test_teacher_step_equals_diffeqsolve(solver_name):
    sde = KarrasSDE()
    oracle = OracleDenoiser(DATA, MASK, sde)
    term = pf_ode_term(oracle, sde)
    solver = solver_from_name(solver_name)
    z = sde.perturb(jax.tree.map(lambda a: a[0], DATA), MASK, 2.0, key=jr.key(3))[0]

    @jax.jit
    def both(t0, t1):
        manual = teacher_step(solver, term, t0, t1, z, MASK)
        sol = dfx.diffeqsolve(
            term, solver, t0, t1, None, z, args=MASK, stepsize_controller=dfx.StepTo(jnp.stack([t0, t1]))
        )
        return manual, jax.tree.map(lambda a: a[-1], sol.ys)

    for t0, t1 in [(2.0, 1.2), (1.2, 2.0), (0.3, 0.05)]:
        manual, reference = both(jnp.float32(t0), jnp.float32(t1))
        np.testing.assert_allclose(manual.positions, reference.positions, rtol=0, atol=1e-6)
        np.testing.assert_allclose(manual.features, reference.features, rtol=0, atol=1e-6)
        assert float(jnp.max(jnp.abs(manual.positions - z.positions))) > 1e-3  # the step did something


# --- NFE -------------------------------------------------------------------------------------------------


class CountingDenoiser(AbstractX0Denoiser):
    """Counts its evaluations on the host (test only)."""

    inner: AbstractDenoiser
    sde: AbstractSDE
    calls: list = eqx.field(static=True)

    def __call__(self, t, z, mask):
        jax.debug.callback(lambda: self.calls.append(1))
        return self.inner(t, z, mask)


@pytest.mark.parametrize(
    "name,sampler",
    [
        ("ancestral", Ancestral(20)),
        pytest.param("ddim", DDIM(20), marks=pytest.mark.slow),
        ("heun", PFODE(dfx.Heun(), 10)),
        pytest.param("tsit5", PFODE(dfx.Tsit5(), 10), marks=pytest.mark.slow),
        ("dopri5_adaptive", PFODE(dfx.Dopri5(), adaptive=True)),
        pytest.param("reverse_sde", ReverseSDE(20), marks=pytest.mark.slow),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_reported_nfe_counts_denoiser_calls(name, sampler):
    calls = []
    den = CountingDenoiser(OracleDenoiser(DATA, MASK, EDM), EDM, calls)
    _, nfe = jax.jit(lambda k: sampler(den, MASK, 6, key=k))(jr.key(4))
    jax.effects_barrier()
    assert int(nfe) == len(calls), (name, int(nfe), len(calls))


# --- sample_molecules ------------------------------------------------------------------------------------


def test_sample_molecules_is_batch_size_independent():
    zeros = Molecule(jnp.zeros((INFO.max_n_atoms, 3)), jnp.zeros((INFO.max_n_atoms, INFO.n_feat)))
    oracle = GaussianOracle(zeros, 0.5, EDM)
    traces = []

    def sampler(den, mask, *, key):
        traces.append(1)  # runs at trace time only
        return DDIM(8, eta=1.0)(den, mask, INFO.n_feat, key=key)

    fn = eqx.Partial(sampler, oracle)
    a = sample_molecules(fn, 7, INFO, key=jr.key(5), batch_size=3)
    assert len(traces) == 1  # three batches of 3, one compilation
    b = sample_molecules(fn, 7, INFO, key=jr.key(5), batch_size=5)
    assert len(traces) == 2
    # a second call with the same batch size and sampler reuses the compilation; `start` skips molecules
    tail = sample_molecules(fn, 7, INFO, key=jr.key(5), batch_size=3, start=4)
    assert len(traces) == 2
    np.testing.assert_array_equal(tail.atom_types, a.atom_types[4:])
    np.testing.assert_allclose(tail.positions, a.positions[4:], rtol=0, atol=1e-6)
    assert a.positions.shape == (7, 29, 3) and a.atom_types.shape == (7, 29)
    np.testing.assert_array_equal(a.n_atoms, b.n_atoms)
    np.testing.assert_array_equal(a.atom_types, b.atom_types)
    np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a.nfe, 9)
    for i in range(7):
        m = a.n_atoms[i]
        assert INFO.size_counts[m] > 0
        assert np.all(a.atom_types[i, :m] >= 0) and np.all(a.atom_types[i, m:] == -1)
        assert np.all(a.positions[i, m:] == 0) and np.all(a.charges[i, m:] == 0)
        np.testing.assert_allclose(a.positions[i].sum(0), 0, atol=1e-4)
    # molecules differ from one another (independent keys)
    assert len({a.positions[i, 0, 0].item() for i in range(7)}) == 7


def test_non_finite_molecules_are_flagged_counted_and_never_scored():
    """A sampler that blows up on some molecules (here: those of an odd size) yields them flagged, not as data:
    `Samples.finite` is False for exactly those, evaluate_samples counts them as n_nonfinite and scores the
    rest, and metrics.evaluate refuses them outright."""
    from sde_mol import metrics

    zeros = Molecule(jnp.zeros((INFO.max_n_atoms, 3)), jnp.zeros((INFO.max_n_atoms, INFO.n_feat)))
    oracle = GaussianOracle(zeros, 0.5, EDM)

    def sampler(den, mask, *, key):
        mol, nfe = DDIM(4)(den, mask, INFO.n_feat, key=key)
        blow_up = jnp.sum(mask) % 2 == 1
        return Molecule(jnp.where(blow_up, jnp.nan, mol.positions), mol.features), nfe

    res = sample_molecules(eqx.Partial(sampler, oracle), 12, INFO, key=jr.key(3), batch_size=6)
    odd = res.n_atoms % 2 == 1
    assert 0 < np.sum(odd) < 12
    np.testing.assert_array_equal(res.finite, ~odd)
    scores = metrics.evaluate_samples(res)
    assert scores["n_nonfinite"] == np.sum(odd) and scores["n_molecules"] == np.sum(~odd)
    with pytest.raises(ValueError, match=r"molecule\(s\) have non-finite positions"):
        metrics.evaluate(res.positions, res.atom_types)
    none_left = res._replace(finite=np.zeros(12, bool))
    assert metrics.evaluate_samples(none_left) == {
        "n_molecules": 0,
        "n_nonfinite": 12,
        **dict.fromkeys(
            ["atom_stability", "molecule_stability", "validity", "uniqueness", "valid_and_unique", "novelty"]
            + ["connected_validity"]
        ),
    }


def test_partial_chunks_are_padded_to_a_multiple_of_8_not_the_batch_size():
    """50 molecules in 4 buckets at batch size 50: each bucket's chunk holds its molecules padded to the next
    multiple of 8 (at most 50 slots in all but 4 * 7), every molecule exactly once."""
    from sde_mol.samplers.batching import _chunks

    chunks = list(_chunks(50, INFO, jr.key(0), 50, 0, (17, 20, 23, 29)))
    rows = np.concatenate([c[0] for c in chunks])
    assert sorted(rows.tolist()) == list(range(50))
    for chunk, index, sizes, cap in chunks:
        assert len(index) == len(sizes) == -(-len(chunk) // 8) * 8 and np.all(sizes <= cap)
    full = list(_chunks(100, INFO, jr.key(0), 8, 0, (29,)))
    assert all(len(c[1]) == 8 for c in full)  # full chunks keep the batch size


def test_bucketed_sampling_uses_the_smallest_width_and_is_batch_size_independent():
    zeros = Molecule(jnp.zeros((INFO.max_n_atoms, 3)), jnp.zeros((INFO.max_n_atoms, INFO.n_feat)))
    widths = []

    def sampler(den, mask, *, key):
        widths.append(mask.shape[0])  # trace time only: one entry per compilation
        z = Molecule(zeros.positions[: mask.shape[0]], zeros.features[: mask.shape[0]])
        return DDIM(4, eta=1.0)(GaussianOracle(z, 0.5, EDM), mask, INFO.n_feat, key=key)

    fn = eqx.Partial(sampler, None)
    buckets = (17, 20, 23, 29)
    n = 40
    sizes = draw_sizes(n, INFO, key=jr.key(7))
    used = sorted(set(capacities(sizes, INFO, buckets).tolist()))
    a = sample_molecules(fn, n, INFO, key=jr.key(7), batch_size=6, buckets=buckets)
    assert sorted(widths) == used and len(used) >= 3  # one compilation per width used, QM9 sizes span buckets
    b = sample_molecules(fn, n, INFO, key=jr.key(7), batch_size=11, buckets=buckets)
    tail = sample_molecules(fn, n, INFO, key=jr.key(7), batch_size=6, start=25, buckets=buckets)
    np.testing.assert_array_equal(a.n_atoms, sizes)
    np.testing.assert_array_equal(a.atom_types, b.atom_types)
    np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=1e-6)
    np.testing.assert_allclose(tail.positions, a.positions[25:], rtol=0, atol=1e-6)
    assert a.positions.shape == (n, 29, 3)
    for i in range(n):
        m = a.n_atoms[i]
        assert np.all(a.atom_types[i, :m] >= 0) and np.all(a.atom_types[i, m:] == -1)
        assert np.all(a.positions[i, m:] == 0) and np.all(a.charges[i, m:] == 0)
        np.testing.assert_allclose(a.positions[i].sum(0), 0, atol=1e-4)
    # the single full-width bucket is the unbucketed sampler, molecule for molecule
    full = sample_molecules(fn, 9, INFO, key=jr.key(7), batch_size=6, buckets=(29,))
    plain = sample_molecules(fn, 9, INFO, key=jr.key(7), batch_size=6)
    np.testing.assert_array_equal(full.positions, plain.positions)
    with pytest.raises(ValueError, match="largest"):
        sample_molecules(fn, 4, INFO, key=jr.key(7), batch_size=4, buckets=(17, 20))
