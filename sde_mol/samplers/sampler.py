"""Samplers as objects: `sampler(denoiser, mask, n_feat, *, key) -> (molecule, nfe)` for ONE molecule.

`AbstractSampler.__call__` is the one skeleton every sampler shares: draw z ~ prior at t_max, `solve` along the
sampler's decreasing time grid (`times`, from the SDE: t_max -> t_min), then `finish` (one last denoiser call,
or EDM's p(x, h | z_0) for the ancestral chain). A final class only says how it steps. The result is in the
normalised state (`batching.decode` turns it into atoms); nfe counts denoiser evaluations.

Keys: `jr.split(key, 3)` gives the prior, the solve and the finish keys; step i of a solve uses
`jr.fold_in(solve_key, i)`.
"""

import abc

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr

from ..denoisers import AbstractDenoiser
from ..molecule import Molecule, com_free_normal
from ..schedules import GridSpacing, time_grid
from ..sde import AbstractSDE
from ..typing import Key, NodeMask, Scalar
from .steps import (
    NFE,
    Times,
    ancestral_solve,
    consistency_solve,
    ddim_solve,
    edm_final_decode,
    pf_ode_solve,
    reverse_sde_solve,
)


def _evals(n: int) -> NFE:
    return jnp.asarray(n, jnp.int32)


class AbstractSampler(eqx.Module):
    """prior -> solve -> finish, written once. Subclasses give the grid and the two stages:

    * `times(sde)`: the decreasing grid, ts[0] = t_max (where the prior is drawn) to ts[-1];
    * `solve(denoiser, z, mask, ts, *, key) -> (z at ts[-1], nfe)`;
    * `finish(denoiser, z, mask, t, *, key) -> (molecule, nfe)`: from the last state to the sample.
    """

    @abc.abstractmethod
    def times(self, sde: AbstractSDE) -> Times:
        raise NotImplementedError

    @abc.abstractmethod
    def solve(
        self, denoiser: AbstractDenoiser, z: Molecule, mask: NodeMask, ts: Times, *, key: Key
    ) -> tuple[Molecule, NFE]:
        raise NotImplementedError

    @abc.abstractmethod
    def finish(
        self, denoiser: AbstractDenoiser, z: Molecule, mask: NodeMask, t: Scalar, *, key: Key
    ) -> tuple[Molecule, NFE]:
        raise NotImplementedError

    def __call__(self, denoiser: AbstractDenoiser, mask: NodeMask, n_feat: int, *, key: Key) -> tuple[Molecule, NFE]:
        k_prior, k_solve, k_finish = jr.split(key, 3)
        ts = self.times(denoiser.sde)
        z = denoiser.sde.prior(mask, n_feat, key=k_prior)
        z, nfe = self.solve(denoiser, z, mask, ts, key=k_solve)
        x, nfe_finish = self.finish(denoiser, z, mask, ts[-1], key=k_finish)
        return x, nfe + nfe_finish


def _check_steps(name: str, n_steps: int) -> None:
    if n_steps < 1:
        raise ValueError(f"{name}: n_steps must be >= 1, got {n_steps}")


def _resolvable(name: str, n_steps: int, sde: AbstractSDE) -> None:
    """A chain of n_steps transitions on an SDE that resolves only T distinct times needs n_steps <= T."""
    resolution = sde.time_resolution
    if resolution is not None and n_steps > resolution:
        raise ValueError(
            f"{name} with {n_steps} steps on an SDE that resolves {resolution} time steps: two steps would share "
            "a table entry (sample on the SDE's continuous twin, `sde.continuous_twin()`, for more steps)"
        )


def _denoise(denoiser: AbstractDenoiser, z: Molecule, mask: NodeMask, t: Scalar) -> tuple[Molecule, NFE]:
    return denoiser(t, z, mask), _evals(1)


class Ancestral(AbstractSampler):
    """EDM's sampler: n_steps ancestral steps p(z_s | z_t), then EDM's p(x, h | z_0). With EDM's discrete SDE,
    n_steps = T and the uniform grid, this is the reference loop s = T-1..0, t = (s+1)/T."""

    n_steps: int = eqx.field(static=True, default=1000)
    grid: GridSpacing = eqx.field(static=True, default="uniform")
    rho: float = eqx.field(static=True, default=7.0)

    def __check_init__(self):
        _check_steps("Ancestral", self.n_steps)

    def times(self, sde: AbstractSDE) -> Times:
        _resolvable("Ancestral", self.n_steps, sde)
        return time_grid(sde, self.n_steps, self.grid, self.rho)

    def solve(self, denoiser, z, mask, ts, *, key):
        return ancestral_solve(denoiser, denoiser.sde, z, mask, ts, key=key), _evals(ts.shape[0] - 1)

    def finish(self, denoiser, z, mask, t, *, key):
        noise = com_free_normal(key, mask, z.n_feat)
        return edm_final_decode(denoiser, denoiser.sde, t, z, mask, noise), _evals(1)


class DDIM(AbstractSampler):
    """DDIM (Song et al. 2021) along the grid, then x0 = denoiser(t_min, z): deterministic for eta = 0,
    DDPM-like for eta = 1."""

    n_steps: int = eqx.field(static=True, default=100)
    eta: float = eqx.field(static=True, default=0.0)
    grid: GridSpacing = eqx.field(static=True, default="uniform")
    rho: float = eqx.field(static=True, default=7.0)

    def __check_init__(self):
        _check_steps("DDIM", self.n_steps)
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"DDIM: eta must be in [0, 1], got {self.eta}")

    def times(self, sde: AbstractSDE) -> Times:
        _resolvable("DDIM", self.n_steps, sde)
        return time_grid(sde, self.n_steps, self.grid, self.rho)

    def solve(self, denoiser, z, mask, ts, *, key):
        return ddim_solve(denoiser, denoiser.sde, z, mask, ts, eta=self.eta, key=key), _evals(ts.shape[0] - 1)

    def finish(self, denoiser, z, mask, t, *, key):
        return _denoise(denoiser, z, mask, t)


class PFODE(AbstractSampler):
    """The probability-flow ODE solved by any diffrax solver, on a fixed grid (StepTo) or adaptively (a PID
    controller from the first step (t_max - t_min) / n_steps, at most `max_steps` steps), then
    x0 = denoiser(t_min, z). nfe counts the solver's evaluations (its tableau's stages)."""

    solver: dfx.AbstractSolver = eqx.field(default_factory=dfx.Heun)
    n_steps: int = eqx.field(static=True, default=50)
    grid: GridSpacing = eqx.field(static=True, default="uniform")
    rho: float = eqx.field(static=True, default=7.0)
    adaptive: bool = eqx.field(static=True, default=False)
    rtol: float = eqx.field(static=True, default=1e-4)
    atol: float = eqx.field(static=True, default=1e-4)
    max_steps: int = eqx.field(static=True, default=4096)

    def __check_init__(self):
        _check_steps("PFODE", self.n_steps)

    def times(self, sde: AbstractSDE) -> Times:
        return time_grid(sde, self.n_steps, self.grid, self.rho)

    def solve(self, denoiser, z, mask, ts, *, key):
        return pf_ode_solve(
            denoiser,
            denoiser.sde,
            z,
            mask,
            ts,
            solver=self.solver,
            adaptive=self.adaptive,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
        )

    def finish(self, denoiser, z, mask, t, *, key):
        return _denoise(denoiser, z, mask, t)


class ReverseSDE(AbstractSampler):
    """Euler-Maruyama of the reverse-time SDE (diffrax), then x0 = denoiser(t_min, z). `brownian_tol`: a
    `VirtualBrownianTree` of that tolerance instead of independent increments (differentiable in reverse mode)."""

    n_steps: int = eqx.field(static=True, default=500)
    grid: GridSpacing = eqx.field(static=True, default="uniform")
    rho: float = eqx.field(static=True, default=7.0)
    brownian_tol: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        _check_steps("ReverseSDE", self.n_steps)

    def times(self, sde: AbstractSDE) -> Times:
        return time_grid(sde, self.n_steps, self.grid, self.rho)

    def solve(self, denoiser, z, mask, ts, *, key):
        z = reverse_sde_solve(denoiser, denoiser.sde, z, mask, ts, key=key, brownian_tol=self.brownian_tol)
        return z, _evals(ts.shape[0] - 1)

    def finish(self, denoiser, z, mask, t, *, key):
        return _denoise(denoiser, z, mask, t)


class Consistency(AbstractSampler):
    """A consistency model's sampler (Song et al. 2023, Algorithm 1): x = f(t_max, z_T), then for each time of
    the decreasing list `ts` re-noise x to it and apply f again (`steps.consistency_solve`). `ts` empty: the
    one-step sample; `steps.consistency_times(sde, n)` gives the default list of an n-step sampler."""

    ts: Times = eqx.field(converter=lambda ts: jnp.asarray(ts, jnp.float32), default=())

    def times(self, sde: AbstractSDE) -> Times:
        return jnp.concatenate([jnp.full((1,), sde.t_max, jnp.float32), self.ts])

    def solve(self, denoiser, z, mask, ts, *, key):
        x = denoiser(ts[0], z, mask)
        return consistency_solve(denoiser, denoiser.sde, x, mask, ts[1:], key=key), _evals(ts.shape[0])

    def finish(self, denoiser, z, mask, t, *, key):
        return z, _evals(0)
