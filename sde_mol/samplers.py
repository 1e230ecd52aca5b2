"""Samplers: from the prior to molecules, for ONE molecule (vmap for batches; `sample_molecules` batches).

Every `*_sample(denoiser, sde, mask, n_feat, *, key, ...)` returns `(molecule, nfe)`: the sample in the
normalised state (decode with `decode`) and the number of denoiser evaluations. Each is prior -> a `*_solve`
from t_max to t_min (public, reusable with any start state and grid) -> one final denoiser call:

* ancestral: EDM's p(z_s | z_t) chain (Hoogeboom et al. 2022, facts section 5), then EDM's p(x, h | z_0).
* DDIM (Song et al. 2021): deterministic for eta = 0, DDPM-like for eta = 1.
* PF-ODE: `diffrax.diffeqsolve` of dz/dt = f z - g^2/2 score on a fixed grid (StepTo) or adaptively (PID).
* reverse SDE: Euler-Maruyama of dz = (f z - g^2 score) dt + g dW_bar through diffrax, CoM-free noise.
* consistency (Song et al. 2023, Algorithm 1): x = f(t_max, z_T) in one step; multistep re-noises x to each
  of a decreasing list of intermediate times and applies f again (`consistency_times` gives the default list).

Time grids (`grid`): "uniform" in the SDE's time, or "karras" (rho-spaced in sigma / alpha); see
`schedules.time_grid`. Keys: per-step keys `jr.fold_in(key, step)`; in `sample_molecules` molecule i uses
`jr.fold_in(key, i)` for its size and its sample, so it does not depend on the batch size.
"""

from collections.abc import Callable
from typing import NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from .data.qm9 import DatasetInfo
from .denoisers import AbstractDenoiser, eps_to_x0, x0_to_eps
from .molecule import Molecule, com_free_normal, project, remove_com
from .schedules import GridSpacing, karras_sigma_grid, time_grid
from .sde import AbstractSDE
from .terms import SolverName, pf_ode_term, reverse_sde_terms, solver_evals, solver_from_name
from .typing import Key, NodeMask, Scalar

Grid = GridSpacing  # "uniform" | "karras", see schedules.time_grid
Times = Float[Array, " n_times"]
NFE = Int[Array, ""]


# --- ancestral (EDM) -------------------------------------------------------------------------------------


def ancestral_mean_std(
    denoiser: AbstractDenoiser, sde: AbstractSDE, s: Scalar, t: Scalar, z: Molecule, mask: NodeMask
) -> tuple[Molecule, Float[Array, ""]]:
    """Mean and std of p(z_s | z_t), s < t (EDM): with eps_hat = denoiser.eps(t, z_t),
    mu = z_t / alpha_{t|s} - sigma^2_{t|s} / (alpha_{t|s} sigma_t) eps_hat, std = sigma_{t|s} sigma_s / sigma_t."""
    alpha_ts, sigma2_ts = sde.transition(s, t)
    _, sigma_s = sde.marginal(s)
    _, sigma_t = sde.marginal(t)
    eps = denoiser.eps(t, z, mask)
    mu = z / alpha_ts - (sigma2_ts / (alpha_ts * sigma_t)) * eps
    return mu, jnp.sqrt(sigma2_ts) * sigma_s / sigma_t


def ancestral_step(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    s: Scalar,
    t: Scalar,
    z: Molecule,
    mask: NodeMask,
    noise: Molecule,
) -> Molecule:
    """z_s = mu + std * noise, re-projected (positions CoM-free). `noise`: standard normal on the state
    space (`com_free_normal`); passed in, so the step is a deterministic function (fixture parity)."""
    mu, std = ancestral_mean_std(denoiser, sde, s, t, z, mask)
    return project(mu + std * noise, mask)


def edm_final_decode(
    denoiser: AbstractDenoiser, sde: AbstractSDE, t: Scalar, z0: Molecule, mask: NodeMask, noise: Molecule
) -> Molecule:
    """EDM's p(x, h | z_0): x = x_hat + (sigma_0 / alpha_0) noise with x_hat = (z_0 - sigma_0 eps_hat) / alpha_0
    (positions, CoM-free), and the features of z_0 itself (not of x_hat), still normalised."""
    alpha, sigma = sde.marginal(t)
    x_hat = eps_to_x0(denoiser.eps(t, z0, mask), z0, alpha, sigma)
    positions = remove_com(x_hat.positions + (sigma / alpha) * noise.positions, mask)
    return Molecule(positions, z0.features * mask[:, None])


def ancestral_solve(
    denoiser: AbstractDenoiser, sde: AbstractSDE, z: Molecule, mask: NodeMask, ts: Times, *, key: Key
) -> Molecule:
    """Run the ancestral chain along the decreasing grid `ts` (ts[0] -> ts[-1]); step i uses
    `jr.fold_in(key, i)`."""

    def body(i, z):
        noise = com_free_normal(jr.fold_in(key, i), mask, z.n_feat)
        return ancestral_step(denoiser, sde, ts[i + 1], ts[i], z, mask, noise)

    return jax.lax.fori_loop(0, ts.shape[0] - 1, body, z)


def ancestral_sample(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    mask: NodeMask,
    n_feat: int,
    *,
    key: Key,
    n_steps: int = 1000,
    grid: Grid = "uniform",
    rho: float = 7.0,
) -> tuple[Molecule, NFE]:
    """EDM's sampler: prior, n_steps ancestral steps t_max -> t_min, final decode. With the discrete EDM
    SDE, n_steps = T and the uniform grid this is the reference loop s = T-1..0, t = (s+1)/T."""
    k_prior, k_steps, k_final = jr.split(key, 3)
    ts = time_grid(sde, n_steps, grid, rho)
    z = sde.prior(mask, n_feat, key=k_prior)
    z = ancestral_solve(denoiser, sde, z, mask, ts, key=k_steps)
    out = edm_final_decode(denoiser, sde, ts[-1], z, mask, com_free_normal(k_final, mask, n_feat))
    return out, jnp.asarray(n_steps + 1, jnp.int32)


# --- DDIM ------------------------------------------------------------------------------------------------


def ddim_step(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    s: Scalar,
    t: Scalar,
    z: Molecule,
    mask: NodeMask,
    *,
    eta: Scalar,
    key: Key,
) -> Molecule:
    """DDIM update z_t -> z_s (Song et al. 2021, generalised to any SDE):
    z_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c noise, c = eta sigma_{t|s} sigma_s / sigma_t
    (eta = 1: the posterior q(z_s | z_t, x0_hat) std; eta = 0: deterministic). Requires 0 <= eta <= 1."""
    alpha_s, sigma_s = sde.marginal(s)
    alpha_t, sigma_t = sde.marginal(t)
    _, sigma2_ts = sde.transition(s, t)
    x0 = denoiser(t, z, mask)
    eps = x0_to_eps(x0, z, alpha_t, sigma_t)
    c2 = eta**2 * sigma2_ts * (sigma_s / sigma_t) ** 2
    # sigma_s^2 - c^2 >= 0 for eta <= 1 since sigma^2_{t|s} <= sigma_t^2; the clamp only absorbs round-off
    keep = jnp.sqrt(jnp.maximum(sigma_s**2 - c2, 0.0))
    noise = com_free_normal(key, mask, z.n_feat)
    return project(alpha_s * x0 + keep * eps + jnp.sqrt(c2) * noise, mask)


def ddim_solve(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    z: Molecule,
    mask: NodeMask,
    ts: Times,
    *,
    eta: Scalar = 0.0,
    key: Key,
) -> Molecule:
    """DDIM along the decreasing grid `ts`; step i uses `jr.fold_in(key, i)`."""

    def body(i, z):
        return ddim_step(denoiser, sde, ts[i + 1], ts[i], z, mask, eta=eta, key=jr.fold_in(key, i))

    return jax.lax.fori_loop(0, ts.shape[0] - 1, body, z)


def ddim_sample(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    mask: NodeMask,
    n_feat: int,
    *,
    key: Key,
    n_steps: int = 100,
    eta: Scalar = 0.0,
    grid: Grid = "uniform",
    rho: float = 7.0,
) -> tuple[Molecule, NFE]:
    """Prior, n_steps DDIM steps t_max -> t_min, then x0 = denoiser(t_min, z)."""
    k_prior, k_steps = jr.split(key)
    ts = time_grid(sde, n_steps, grid, rho)
    z = ddim_solve(denoiser, sde, sde.prior(mask, n_feat, key=k_prior), mask, ts, eta=eta, key=k_steps)
    return denoiser(ts[-1], z, mask), jnp.asarray(n_steps + 1, jnp.int32)


# --- PF-ODE and reverse SDE through diffrax --------------------------------------------------------------


def _last(ys: Molecule) -> Molecule:
    return jax.tree.map(lambda a: a[-1], ys)


def pf_ode_solve(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    z: Molecule,
    mask: NodeMask,
    ts: Times,
    *,
    solver: SolverName | dfx.AbstractSolver = "heun",
    adaptive: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    max_steps: int = 4096,
) -> tuple[Molecule, NFE]:
    """Integrate the PF-ODE from ts[0] to ts[-1] (either direction): on the grid `ts` (StepTo), or with a
    PID controller starting from the step ts[1] - ts[0] (`adaptive`). Returns (z(ts[-1]), nfe)."""
    solver = solver_from_name(solver) if isinstance(solver, str) else solver
    if adaptive:
        # PI coefficients from diffrax's guidance: far fewer rejected steps than the pure I-controller here
        controller = dfx.PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4)
        dt0 = ts[1] - ts[0]
    else:
        controller, dt0, max_steps = dfx.StepTo(ts), None, ts.shape[0] - 1
    sol = dfx.diffeqsolve(
        pf_ode_term(denoiser, sde),
        solver,
        t0=ts[0],
        t1=ts[-1],
        dt0=dt0,
        y0=z,
        args=mask,
        stepsize_controller=controller,
        saveat=dfx.SaveAt(t1=True),
        max_steps=max_steps,
    )
    per_step, at_init = solver_evals(solver)
    nfe = sol.stats["num_steps"] * per_step + at_init
    return _last(sol.ys), jnp.asarray(nfe, jnp.int32)


def pf_ode_sample(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    mask: NodeMask,
    n_feat: int,
    *,
    key: Key,
    solver: SolverName | dfx.AbstractSolver = "heun",
    n_steps: int = 50,
    grid: Grid = "uniform",
    rho: float = 7.0,
    adaptive: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    max_steps: int = 4096,
) -> tuple[Molecule, NFE]:
    """Prior, PF-ODE t_max -> t_min (fixed grid of n_steps, or adaptive with at most `max_steps` steps), then
    x0 = denoiser(t_min, z)."""
    ts = time_grid(sde, n_steps, grid, rho)
    z0 = sde.prior(mask, n_feat, key=key)
    z, nfe = pf_ode_solve(
        denoiser, sde, z0, mask, ts, solver=solver, adaptive=adaptive, rtol=rtol, atol=atol, max_steps=max_steps
    )
    return denoiser(ts[-1], z, mask), nfe + 1


def reverse_sde_solve(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    z: Molecule,
    mask: NodeMask,
    ts: Times,
    *,
    key: Key,
    brownian_tol: float | None = None,
) -> Molecule:
    """Euler-Maruyama of the reverse-time SDE along the decreasing grid `ts` (diffrax `Euler` on
    drift + CoM-free diffusion terms)."""
    terms = reverse_sde_terms(denoiser, sde, mask, z.n_feat, key=key, brownian_tol=brownian_tol)
    sol = dfx.diffeqsolve(
        terms,
        dfx.Euler(),
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=z,
        args=mask,
        stepsize_controller=dfx.StepTo(ts),
        saveat=dfx.SaveAt(t1=True),
        max_steps=ts.shape[0] - 1,
        # UnsafeBrownianPath supports forward-mode differentiation only
        adjoint=dfx.ForwardMode() if brownian_tol is None else dfx.RecursiveCheckpointAdjoint(),
    )
    return _last(sol.ys)


def reverse_sde_sample(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    mask: NodeMask,
    n_feat: int,
    *,
    key: Key,
    n_steps: int = 500,
    grid: Grid = "uniform",
    rho: float = 7.0,
    brownian_tol: float | None = None,
) -> tuple[Molecule, NFE]:
    """Prior, reverse SDE t_max -> t_min with n_steps Euler-Maruyama steps, then x0 = denoiser(t_min, z)."""
    k_prior, k_path = jr.split(key)
    ts = time_grid(sde, n_steps, grid, rho)
    z = sde.prior(mask, n_feat, key=k_prior)
    z = reverse_sde_solve(denoiser, sde, z, mask, ts, key=k_path, brownian_tol=brownian_tol)
    return denoiser(ts[-1], z, mask), jnp.asarray(n_steps + 1, jnp.int32)


# --- consistency models ----------------------------------------------------------------------------------

CT_MIDPOINT = 0.821
"""iCT's two-step midpoint (Song & Dhariwal 2023, sigma_data = 0.5): the default first re-noising level."""


def consistency_times(sde: AbstractSDE, n_steps: int, *, sigma_hi: float = CT_MIDPOINT, rho: float = 7.0) -> Times:
    """The default intermediate times of an n_steps consistency sampler: n_steps - 1 decreasing times whose
    scaled noise levels s = sigma / alpha are the first n_steps - 1 nodes of the Karras rho grid of n_steps - 1
    intervals from min(sigma_hi, s(t_max)) down to s(t_min). So 2 steps re-noise once to iCT's midpoint
    s = 0.821, and 4 steps to s = 0.821, 0.195, 0.034 on EDM's VP schedule (s_min = 3.2e-3): each further step
    refines at a lower noise level. (Re-noising at the Karras nodes of the whole [s_min, s_max] range would
    start at s = 8.5 for n_steps = 2 on that schedule, which erases the first step's result.) Host-side; the
    result is an array, traced inside `sample_molecules`."""
    if n_steps < 1:
        raise ValueError(f"a consistency sampler takes n_steps >= 1, got {n_steps}")
    if n_steps == 1:
        return jnp.zeros((0,), jnp.float32)
    s_lo = float(sde.scaled_sigma(sde.t_min))
    s_hi = min(float(sigma_hi), float(sde.scaled_sigma(sde.t_max)))
    if not s_lo < s_hi:
        raise ValueError(f"consistency_times: sigma_hi {sigma_hi} is not above the SDE's s(t_min) = {s_lo:.4g}")
    sigmas = karras_sigma_grid(s_lo, s_hi, n_steps - 1, rho)[:-1]
    return sigmas_to_times(sde, sigmas)


def sigmas_to_times(sde: AbstractSDE, sigmas: Float[Array, " n_times"]) -> Times:
    """Times t of `sde` with sigma(t) / alpha(t) = sigmas (`t_from_logsnr`; clipped to the domain)."""
    return sde.t_from_logsnr(-2.0 * jnp.log(jnp.asarray(sigmas, jnp.float32)))


def consistency_solve(
    denoiser: AbstractDenoiser, sde: AbstractSDE, x: Molecule, mask: NodeMask, ts: Times, *, key: Key
) -> Molecule:
    """Song et al. (2023) Algorithm 1 after its first step: for each time t of the decreasing list `ts`,
    re-noise the estimate x (a state at t_min: f's output) to t and map it back with the consistency function:

        z = alpha(t) (x + sqrt(s(t)^2 - s_min^2) eps),   x <- f(t, z),

    s = sigma / alpha, eps standard normal on the state space (CoM-free positions, masked features) from
    `jr.fold_in(key, i)` at step i. x already carries the noise level s_min, so z has exactly the SDE's
    marginal noise sigma(t) = alpha(t) s(t) (for s_min -> 0 this is z = alpha x + sigma eps)."""
    s_min = sde.scaled_sigma(sde.t_min)

    def body(i, x):
        t = ts[i]
        alpha, sigma = sde.marginal(t)
        scale = jnp.sqrt(jnp.maximum((sigma / alpha) ** 2 - s_min**2, 0.0))
        eps = com_free_normal(jr.fold_in(key, i), mask, x.n_feat, x.positions.dtype)
        return denoiser(t, project(alpha * (x + scale * eps), mask), mask)

    if ts.shape[0] == 0:  # a static shape: the one-step sampler traces no loop
        return x
    return jax.lax.fori_loop(0, ts.shape[0], body, x)


def consistency_sample(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    mask: NodeMask,
    n_feat: int,
    *,
    key: Key,
    ts: Times | None = None,
) -> tuple[Molecule, NFE]:
    """A consistency model's sample: x = f(t_max, z_T), z_T from the prior (CoM-free), then one more
    evaluation per intermediate time of the decreasing list `ts` (`consistency_solve`; None or empty: the
    one-step sample). `consistency_times(sde, n)` gives the default list of an n-step sampler."""
    ts = jnp.zeros((0,), jnp.float32) if ts is None else jnp.asarray(ts, jnp.float32)
    k_prior, k_steps = jr.split(key)
    z = sde.prior(mask, n_feat, key=k_prior)
    x = denoiser(sde.t_max, z, mask)
    x = consistency_solve(denoiser, sde, x, mask, ts, key=k_steps)
    return x, jnp.asarray(ts.shape[0] + 1, jnp.int32)


# --- decoding and batching -------------------------------------------------------------------------------


def decode(
    mol: Molecule, mask: NodeMask, info: DatasetInfo
) -> tuple[Float[Array, "n_atoms 3"], Int[Array, " n_atoms"], Int[Array, " n_atoms"]]:
    """Normalised state -> (positions in Angstrom, atom type index (-1 on padding), charge (0 on padding)).

    EDM's inverse normalisation: positions * norm_x + b_x; atom type = argmax of the class channels (ties to
    the lowest index); charge = round-half-even(charge channel * norm_charge + b_charge), or the type's atomic
    number when the dataset has no charge channel."""
    (n_x, n_h, n_c), (b_x, b_h, b_c) = info.norm_values, info.norm_biases
    positions = (mol.positions * n_x + b_x) * mask[:, None]
    classes = mol.features[:, : info.n_types] * n_h + b_h
    types = jnp.where(mask, jnp.argmax(classes, axis=-1), -1).astype(jnp.int32)
    if info.include_charges:
        charge = jnp.round(mol.features[:, info.n_types] * n_c + b_c).astype(jnp.int32)
    else:
        charge = jnp.asarray(info.atomic_numbers, jnp.int32)[jnp.maximum(types, 0)]
    return positions, types, jnp.where(mask, charge, 0)


class Samples(NamedTuple):
    """Decoded molecules on the host, padded to `info.max_n_atoms` slots."""

    positions: np.ndarray  # (n, max_n_atoms, 3) float32, Angstrom, zero on padding
    atom_types: np.ndarray  # (n, max_n_atoms) int32, index into info.atom_decoder, -1 on padding
    charges: np.ndarray  # (n, max_n_atoms) int32, 0 on padding
    n_atoms: np.ndarray  # (n,) int32
    nfe: np.ndarray  # (n,) int32 denoiser evaluations per molecule
    finite: np.ndarray  # (n,) bool: every coordinate and feature of the real atoms is finite (else: a failure)


SamplerFn = Callable[..., tuple[Molecule, NFE]]  # (mask, *, key) -> (molecule, nfe)


def _draw_size(index: Int[Array, ""], key: Key, probs: Float[Array, " n_sizes"]) -> Int[Array, ""]:
    k_size, _ = jr.split(jr.fold_in(key, index))
    return jr.choice(k_size, probs.shape[0], p=probs).astype(jnp.int32)


_draw_sizes = jax.jit(jax.vmap(_draw_size, in_axes=(0, None, None)))


def draw_sizes(n: int, info: DatasetInfo, *, key: Key, start: int = 0) -> np.ndarray:
    """The sizes M_i ~ p(M) of molecules start..n-1 that `sample_molecules` uses (host int32 array)."""
    probs = jnp.asarray(info.size_probs(), jnp.float32)
    return np.asarray(_draw_sizes(jnp.arange(start, n, dtype=jnp.int32), key, probs))


def _sample_one(
    index: Int[Array, ""], n_atoms: Int[Array, ""], sampler_fn: SamplerFn, key: Key, info: DatasetInfo, capacity: int
):
    _, k_sample = jr.split(jr.fold_in(key, index))
    mask = jnp.arange(capacity) < n_atoms
    mol, nfe = sampler_fn(mask, key=k_sample)
    positions, types, charges = decode(mol, mask, info)
    finite = jnp.all(jnp.isfinite(mol.to_array()) | ~mask[:, None])
    return positions, types, charges, nfe, finite


# One compiled function per (batch size, capacity, sampler structure, info), cached across calls: `sampler_fn`'s
# arrays are traced, its non-array leaves (step counts, solver names), `info` and `capacity` are static.
_sample_batch = eqx.filter_jit(eqx.filter_vmap(_sample_one, in_axes=(0, 0, None, None, None, None)))


def capacities(sizes: np.ndarray, info: DatasetInfo, buckets: tuple[int, ...] | None) -> np.ndarray:
    """The padded width each molecule is sampled at: the smallest bucket that holds it (no buckets: the
    dataset's capacity). The largest bucket must be at least `info.max_n_atoms`."""
    caps = np.asarray(sorted(set(buckets)) if buckets else [info.max_n_atoms], np.int64)
    if caps[0] < 1 or caps[-1] < info.max_n_atoms:
        raise ValueError(
            f"size buckets {buckets}: expected positive capacities, the largest >= the dataset's maximum "
            f"of {info.max_n_atoms} atoms"
        )
    return caps[np.searchsorted(caps, sizes)]


PARTIAL_BATCH_MULTIPLE = 8
"""A bucket's last, partial chunk is padded to a multiple of this (not to the full batch size): sampling 50
molecules in 4 buckets at batch size 50 would otherwise run 200 slots for 50 molecules. One extra compilation
per bucket at most (cached on disk by the recipes), against up to a whole wasted batch per bucket."""


def _chunk_width(k: int, batch_size: int) -> int:
    """The padded batch of a chunk of k molecules: the batch size, or for a partial chunk the next multiple of
    PARTIAL_BATCH_MULTIPLE (at most the batch size)."""
    return min(batch_size, -(-k // PARTIAL_BATCH_MULTIPLE) * PARTIAL_BATCH_MULTIPLE)


def _chunks(n: int, info: DatasetInfo, key: Key, batch_size: int, start: int, buckets):
    """(rows, indices, sizes, capacity) per compiled call; each chunk is filled up to `_chunk_width`."""
    sizes = draw_sizes(n, info, key=key, start=start)
    caps = capacities(sizes, info, buckets)
    for cap in np.unique(caps):
        rows = np.nonzero(caps == cap)[0]
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            filled = np.concatenate([chunk, np.repeat(chunk[-1:], _chunk_width(len(chunk), batch_size) - len(chunk))])
            yield chunk, filled + start, sizes[filled], int(cap)


def compile_sampler(
    sampler_fn: SamplerFn,
    n: int,
    info: DatasetInfo,
    *,
    key: Key,
    batch_size: int,
    start: int = 0,
    buckets: tuple[int, ...] | None = None,
) -> None:
    """Compile ahead of time every batch function that `sample_molecules` with the same arguments will call
    (one per width and padded batch used), so that a following `sample_molecules` runs at steady-state speed."""
    shapes = {(len(index), cap) for _, index, _, cap in _chunks(n, info, key, batch_size, start, buckets)}
    for b, cap in sorted(shapes):
        index, sizes = jnp.arange(b, dtype=jnp.int32), jnp.full((b,), cap, jnp.int32)
        _sample_batch.lower(index, sizes, sampler_fn, key, info, cap).compile()


def sample_molecules(
    sampler_fn: SamplerFn,
    n: int,
    info: DatasetInfo,
    *,
    key: Key,
    batch_size: int,
    start: int = 0,
    buckets: tuple[int, ...] | None = None,
    progress: bool = False,
) -> Samples:
    """Draw molecules start..n-1: sizes M ~ p(M) (`info.size_probs()`), then `sampler_fn(mask, key=...)`.

    Molecule i uses `jr.fold_in(key, i)` only, so it is the same for every batch size and every `start`
    (sampling 0..b-1 then b..n-1 gives the same n molecules as 0..n-1 at once). Batches have a fixed shape
    (a partial last one is filled up to a multiple of 8 and trimmed), so sampling compiles once per batch shape
    and sampler. Pass
    `sampler_fn` as an `eqx.Partial` (e.g. `eqx.Partial(pf_ode_sample, denoiser, sde, n_feat=6)`) so that
    model weights are traced arguments rather than constants baked into the compiled program.

    `buckets` (e.g. (17, 20, 23, 29) for QM9): molecules are grouped by size and each group is sampled at the
    smallest bucket width that holds it instead of the full capacity (the EGNN's work grows with width^2),
    one compilation per bucket. A molecule's noise has the shape of its width, so molecule i is the same for
    every batch size and `start` under one bucket set, but differs between bucket sets. Outputs are padded
    to `info.max_n_atoms` slots either way. `progress`: a progress bar (molecules, molecules/s, ETA) on stderr.
    """
    m, width = n - start, info.max_n_atoms
    positions = np.zeros((m, width, 3), np.float32)
    types = np.full((m, width), -1, np.int32)
    charges = np.zeros((m, width), np.int32)
    n_atoms = np.zeros(m, np.int32)
    nfe = np.zeros(m, np.int32)
    finite = np.zeros(m, bool)
    bar = tqdm(total=m, unit="mol", desc="sampling", disable=not progress, smoothing=0.1)
    for rows, index, sizes, cap in _chunks(n, info, key, batch_size, start, buckets):
        out = jax.device_get(_sample_batch(jnp.asarray(index), jnp.asarray(sizes), sampler_fn, key, info, cap))
        k = len(rows)
        positions[rows, :cap], types[rows, :cap], charges[rows, :cap] = out[0][:k], out[1][:k], out[2][:k]
        n_atoms[rows], nfe[rows], finite[rows] = sizes[:k], out[3][:k], out[4][:k]
        bar.update(k)
    bar.close()
    return Samples(positions, types, charges, n_atoms, nfe, finite)
