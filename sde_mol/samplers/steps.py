"""The numerics of every sampler, for ONE molecule: single steps and `*_solve` loops from any start state along
any decreasing time grid (reusable by objectives, e.g. progressive distillation's DDIM targets).

* ancestral: EDM's p(z_s | z_t) chain (Hoogeboom et al. 2022, facts section 5) and EDM's final p(x, h | z_0).
* DDIM (Song et al. 2021): deterministic for eta = 0, DDPM-like for eta = 1.
* PF-ODE: `diffrax.diffeqsolve` of dz/dt = f z - g^2/2 score on a fixed grid (StepTo) or adaptively (PID).
* reverse SDE: Euler-Maruyama of dz = (f z - g^2 score) dt + g dW_bar through diffrax, CoM-free noise.
* consistency (Song et al. 2023, Algorithm 1): re-noise the estimate to each intermediate time, map it back.

Step i of a loop uses `jr.fold_in(key, i)`.
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int

from ..denoisers import AbstractDenoiser, eps_to_x0, x0_to_eps
from ..molecule import Molecule, com_free_normal, project, remove_com
from ..schedules import karras_sigma_grid
from ..sde import AbstractSDE
from ..terms import pf_ode_term, reverse_sde_terms, solver_evals
from ..typing import Key, NodeMask, Scalar

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
    noise: bool = True,
) -> Molecule:
    """DDIM update z_t -> z_s (Song et al. 2021, generalised to any SDE):
    z_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c noise, c = eta sigma_{t|s} sigma_s / sigma_t
    (eta = 1: the posterior q(z_s | z_t, x0_hat) std; eta = 0: deterministic). Requires 0 <= eta <= 1.
    `noise=False`: the step's mean (the c noise term left out; the same as eta = 0 only when eta = 0)."""
    alpha_s, sigma_s = sde.marginal(s)
    alpha_t, sigma_t = sde.marginal(t)
    _, sigma2_ts = sde.transition(s, t)
    x0 = denoiser(t, z, mask)
    eps = x0_to_eps(x0, z, alpha_t, sigma_t)
    c2 = eta**2 * sigma2_ts * (sigma_s / sigma_t) ** 2
    # sigma_s^2 - c^2 >= 0 for eta <= 1 since sigma^2_{t|s} <= sigma_t^2; the clamp only absorbs round-off
    keep = jnp.sqrt(jnp.maximum(sigma_s**2 - c2, 0.0))
    mean = alpha_s * x0 + keep * eps
    if not noise:
        return project(mean, mask)
    return project(mean + jnp.sqrt(c2) * com_free_normal(key, mask, z.n_feat), mask)


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
    solver: dfx.AbstractSolver,
    adaptive: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    max_steps: int = 4096,
) -> tuple[Molecule, NFE]:
    """Integrate the PF-ODE from ts[0] to ts[-1] (either direction): on the grid `ts` (StepTo), or with a
    PID controller starting from the step ts[1] - ts[0] (`adaptive`). Returns (z(ts[-1]), nfe)."""
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
