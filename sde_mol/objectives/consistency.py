"""Consistency distillation (CD) and consistency training (CT): Song et al. (2023), Algorithms 2 and 3, with the
improvements of Song & Dhariwal (2023, iCT), the ECT-style initialisation of Geng et al. (2024) and the two-stage
truncated training of Lee et al. (2025, TCM).

Notation (VE view). Every SDE of sde_mol has z_t = alpha(t) x0 + sigma(t) eps, so z~ = z / alpha = x0 + s eps
with the scaled noise level s(t) = sigma / alpha. The discretisation, the noise, the weighting and the
pseudo-Huber constant all live in s, exactly as in the papers (where alpha = 1 and s = t); the states handed to
the networks and to the teacher's solver are the SDE's own z = alpha(t) z~, at the times t(s) of the SDE
(`AbstractSDE.t_from_logsnr`, exact end points t_min, t_max). So one code path serves `KarrasSDE` (t = s),
`VESDE` and the VP processes. Use a continuous-time SDE: `DiscreteVPSDE`'s lookup is piecewise constant, which
snaps fine grids onto its 1000 table levels (its continuous twin is `PolynomialVPSDE`).

One loss term, for one molecule x with mask (`ConsistencyLoss.loss_one`):

    N = N(k)                                   a traced integer: a curriculum of the step k, never a shape
    s_i = karras_sigma(i, N, s_min, s_max, rho)  i = 0..N-1, increasing, s_0 = s_min, s_{N-1} = s_max
    n ~ p(n), n in 0..N-2                       uniform (CM) or iCT's discretised log-normal
    z ~ N(0, I) on the state space (CoM-free positions, masked features)
    x_{n+1} = alpha(t_{n+1}) (x + s_{n+1} z)
    x^_n    = one step of the teacher's PF-ODE solver t_{n+1} -> t_n        (CD, `TeacherStep`)
            = alpha(t_n) (x + s_n z)                                         (CT, `UnbiasedEstimator`)
    loss    = lambda(s_n, s_{n+1}) d(f_theta(t_{n+1}, x_{n+1}), stop_grad f_target(t_n, x^_n))

The CD teacher is any `AbstractDenoiser` (a trained checkpoint or the exact oracle); its step is
`terms.teacher_step` with the SAME diffrax solver object that `pf_ode_sample` uses (euler or heun by name),
so it equals `diffeqsolve` over [t_n, t_{n+1}] (pinned in tests). The target network is the `target` passed
by `train.make_step` (an EMA of the student with rate mu, or mu(k)); with `target=None` (a state built with
`with_target=False`) it is the stop-gradient of the student itself (iCT: no EMA target).

Distances d, summed over the real entries of the state (positions and features): squared L2, L1, and iCT's
pseudo-Huber sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim) by default, dim = (M - 1) 3 + M n_feat
the state-space dimension of the molecule (so c scales with molecule size, as iCT's with image size).
Weightings lambda: uniform (CM) or 1 / (s_{n+1} - s_n) (iCT).

Truncated consistency models (TCM). A full-range consistency model spends most of its capacity on the
denoising levels, and the one-step sample inherits the precision the bootstrapped targets carry up the whole
grid. TCM's stage 2 trains a copy of the stage-1 model only on the intervals above a level s' (`TruncatedIndex`)
and takes every target at or below s' from the frozen stage-1 model (`ConsistencyLoss.boundary`); the result,
`denoisers.TruncatedConsistencyFunction(stage1, stage2, s')`, is a consistency function again. With the iCT
loss the boundary interval has the largest weight 1 / (s_{n+1} - s_n), which anchors the solution (with uniform
weighting it collapses); on a fine grid a uniform draw reaches it too rarely and the solution collapses as well,
so give it a fixed share of the draws (`TruncatedIndex(s', boundary_fraction)`; `truncated_loss` builds stage 2
from stage 1's objective; the measurements are in experiments/NOTES.md).

Atom types and charges are channels of the state (EDM's [one-hot / 4 | Z / 10]): they are noised, stepped by
the teacher and mapped by the consistency function jointly with the positions, exactly as EDM diffuses them;
samples are decoded as for every sampler (`samplers.decode`: argmax of the type channels, rounded charge).
"""

import abc
import dataclasses
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jax.scipy.special import ndtr, ndtri
from jaxtyping import Array, Int

from ..denoisers import TRUNCATION_RTOL, AbstractDenoiser
from ..molecule import Molecule, com_free_normal, project, state_dim
from ..schedules import karras_index, karras_sigma
from ..sde import AbstractSDE
from ..terms import pf_ode_term, teacher_step
from ..typing import IntScalar, Key, NodeMask, Real, Scalar
from .base import AbstractObjective

Curriculum = Callable[..., Int[Array, ""]]  # step -> N(step), e.g. eqx.Partial(schedules.ict_n, total_steps=K)


# --- distances -------------------------------------------------------------------------------------------


def _sq_norm(a: Molecule, b: Molecule, mask: NodeMask) -> Real:
    m = mask[:, None]
    return jnp.sum(jnp.where(m, (a.positions - b.positions) ** 2, 0.0)) + jnp.sum(
        jnp.where(m, (a.features - b.features) ** 2, 0.0)
    )


class AbstractDistance(eqx.Module):
    """d(a, b) >= 0 between two molecules of one mask, over the real entries of the state."""

    @abc.abstractmethod
    def __call__(self, a: Molecule, b: Molecule, mask: NodeMask) -> Real:
        raise NotImplementedError


class L2Distance(AbstractDistance):
    """Squared Euclidean distance ||a - b||^2."""

    def __call__(self, a: Molecule, b: Molecule, mask: NodeMask) -> Real:
        return _sq_norm(a, b, mask)


class L1Distance(AbstractDistance):
    """||a - b||_1."""

    def __call__(self, a: Molecule, b: Molecule, mask: NodeMask) -> Real:
        m = mask[:, None]
        return jnp.sum(jnp.where(m, jnp.abs(a.positions - b.positions), 0.0)) + jnp.sum(
            jnp.where(m, jnp.abs(a.features - b.features), 0.0)
        )


class PseudoHuberDistance(AbstractDistance):
    """iCT's pseudo-Huber metric sqrt(||a - b||^2 + c^2) - c: quadratic below c, linear above. `c=None` uses
    c = c_per_sqrt_dim * sqrt(dim) with the molecule's state-space dimension (iCT: 0.00054 sqrt(d))."""

    c: float | None = None
    c_per_sqrt_dim: float = 0.00054

    def __call__(self, a: Molecule, b: Molecule, mask: NodeMask) -> Real:
        if self.c is None:
            c = self.c_per_sqrt_dim * jnp.sqrt(state_dim(mask, a.n_feat))
        else:
            c = jnp.float32(self.c)
        return jnp.sqrt(_sq_norm(a, b, mask) + c**2) - c


# --- weightings lambda(s_n, s_{n+1}) ---------------------------------------------------------------------


class AbstractWeighting(eqx.Module):
    @abc.abstractmethod
    def __call__(self, s_cur: Real, s_next: Real) -> Real:
        raise NotImplementedError


class UniformWeighting(AbstractWeighting):
    """lambda = 1 (Song et al. 2023)."""

    def __call__(self, s_cur: Real, s_next: Real) -> Real:
        return jnp.ones_like(s_cur)


class InverseStepWeighting(AbstractWeighting):
    """lambda = 1 / (s_{n+1} - s_n) (iCT): balances the small differences of fine intervals."""

    def __call__(self, s_cur: Real, s_next: Real) -> Real:
        return 1.0 / (s_next - s_cur)


# --- the interval index n --------------------------------------------------------------------------------


class AbstractIndexSampler(eqx.Module):
    """Draws the interval index n in 0..N-2 (the pair s_n < s_{n+1}) for a traced N."""

    @abc.abstractmethod
    def __call__(self, n_points: Int[Array, ""], s_min: Real, s_max: Real, rho: float, *, key: Key) -> Int[Array, ""]:
        raise NotImplementedError


class UniformIndex(AbstractIndexSampler):
    """n ~ U{0, ..., N-2} (Song et al. 2023)."""

    def __call__(self, n_points: Int[Array, ""], s_min: Real, s_max: Real, rho: float, *, key: Key) -> Int[Array, ""]:
        return jr.randint(key, (), 0, n_points - 1)


class LogNormalIndex(AbstractIndexSampler):
    """iCT's discretised log-normal: p(n) proportional to Phi((log s_{n+1} - P_mean) / P_std) -
    Phi((log s_n - P_mean) / P_std). Drawn without an N-sized table: log s from the normal truncated to
    [log s_min, log s_max] by the inverse CDF, then n = the grid interval that holds s (`karras_index`)."""

    p_mean: float = -1.1
    p_std: float = 2.0

    def __call__(self, n_points: Int[Array, ""], s_min: Real, s_max: Real, rho: float, *, key: Key) -> Int[Array, ""]:
        lo = ndtr((jnp.log(s_min) - self.p_mean) / self.p_std)
        hi = ndtr((jnp.log(s_max) - self.p_mean) / self.p_std)
        u = jr.uniform(key, (), minval=lo, maxval=hi)
        s = jnp.exp(self.p_mean + self.p_std * ndtri(u))
        n = jnp.floor(karras_index(s, n_points, s_min, s_max, rho)).astype(jnp.int32)
        return jnp.clip(n, 0, n_points - 2)


def truncation_node(sigma: float, n_points: Int[Array, ""], s_min: Real, s_max: Real, rho: float) -> Int[Array, ""]:
    """n': the last node of the N-point grid at or below the truncation level sigma (a node within
    `TRUNCATION_RTOL` above it counts), clipped to 0..N-2. Intervals n >= n' have s_{n+1} above sigma."""
    u = karras_index(jnp.float32(sigma) * (1.0 + TRUNCATION_RTOL), n_points, s_min, s_max, rho)
    return jnp.clip(jnp.floor(u).astype(jnp.int32), 0, n_points - 2)


class TruncatedIndex(AbstractIndexSampler):
    """Truncated consistency training (TCM's stage 2, Lee et al. 2025): only the intervals that start at or
    above the truncation node n' = `truncation_node(sigma)`; the lowest one, n', is the boundary interval, whose
    target the stage-1 model supplies (`ConsistencyLoss.boundary`). `boundary_fraction` None: n ~ U{n', ...,
    N-2}, so the boundary gets 1 / (N - 1 - n') of the draws, fewer the finer the grid; p in (0, 1): n = n' with
    probability p, else n ~ U{n' + 1, ..., N-2} (TCM's separate boundary term, a fixed share at every N)."""

    sigma: float
    boundary_fraction: float | None = None

    def __check_init__(self):
        p = self.boundary_fraction
        if p is not None and not 0.0 < p < 1.0:
            raise ValueError(f"TruncatedIndex: boundary_fraction={p} must lie in (0, 1) (or None: uniform)")

    def __call__(self, n_points: Int[Array, ""], s_min: Real, s_max: Real, rho: float, *, key: Key) -> Int[Array, ""]:
        lo = truncation_node(self.sigma, n_points, s_min, s_max, rho)
        if self.boundary_fraction is None:
            return jr.randint(key, (), lo, n_points - 1)
        k_pick, k_above = jr.split(key)
        above = jr.randint(k_above, (), jnp.minimum(lo + 1, n_points - 2), n_points - 1)
        return jnp.where(jr.uniform(k_pick) < self.boundary_fraction, lo, above)


# --- the estimate of the earlier point on the trajectory -------------------------------------------------


class AbstractEstimator(eqx.Module):
    """x^_n, the state at t_cur = t_n on (an estimate of) the PF-ODE trajectory of `sde` through x_{n+1} at
    t_next. The SDE is the objective's one SDE (the student's), passed in: an estimator holds none."""

    @abc.abstractmethod
    def __call__(
        self,
        sde: AbstractSDE,
        x0: Molecule,
        z_next: Molecule,
        noise: Molecule,
        mask: NodeMask,
        t_next: Real,
        t_cur: Real,
    ) -> Molecule:
        raise NotImplementedError


class TeacherStep(AbstractEstimator):
    """Consistency distillation: ONE step of `solver` (a diffrax solver, as in the `PFODE` sampler) on the
    teacher's PF-ODE from t_next to t_cur. The teacher is frozen (never differentiated) and evaluated on the
    objective's SDE (build the student on the teacher's SDE, or its continuous twin)."""

    teacher: AbstractDenoiser
    solver: dfx.AbstractSolver

    def __call__(
        self,
        sde: AbstractSDE,
        x0: Molecule,
        z_next: Molecule,
        noise: Molecule,
        mask: NodeMask,
        t_next: Real,
        t_cur: Real,
    ) -> Molecule:
        teacher = eqx.tree_at(lambda d: d.sde, jax.lax.stop_gradient(self.teacher), sde)
        term = pf_ode_term(teacher, sde)
        return project(teacher_step(self.solver, term, t_next, t_cur, z_next, mask), mask)


class UnbiasedEstimator(AbstractEstimator):
    """Consistency training: x^_n = alpha(t_n) (x + s_n z) with the SAME data point and noise, the unbiased
    estimator of the trajectory (Song et al. 2023, Theorem 2): no teacher."""

    def __call__(
        self,
        sde: AbstractSDE,
        x0: Molecule,
        z_next: Molecule,
        noise: Molecule,
        mask: NodeMask,
        t_next: Real,
        t_cur: Real,
    ) -> Molecule:
        alpha, sigma = sde.marginal(t_cur)
        return alpha * x0 + sigma * noise


# --- the objective ---------------------------------------------------------------------------------------


def time_of_sigma(sde: AbstractSDE, s: Real, at_min: Array, at_max: Array) -> Real:
    """The SDE time t with sigma(t) / alpha(t) = s, exactly t_min / t_max where flagged."""
    t = sde.t_from_logsnr(-2.0 * jnp.log(s))
    return jnp.where(at_min, jnp.float32(sde.t_min), jnp.where(at_max, jnp.float32(sde.t_max), t))


class ConsistencyLoss(AbstractObjective):
    """CD (`estimator=TeacherStep(...)`) or CT (`estimator=UnbiasedEstimator()`); see the module docstring.

    One SDE: the model's (`model.sde`), on which the grid, the noise and the estimator all run.
    `n_points(step)` is the discretisation curriculum N(k) (`schedules.constant_n`, `song_ct_n`, `ict_n`
    wrapped in `eqx.Partial`): traced, so the compiled step serves every N.

    Truncated consistency training / distillation (TCM's stage 2; Lee et al. 2025): with `boundary` (a frozen
    consistency function of the whole range, the stage-1 model) and `boundary_sigma` s', the target of every
    interval n <= n' = `truncation_node(s')` is `boundary(t_n, x^_n)` instead of the target network's, so the
    student, trained above s' (`TruncatedIndex(s')`), inherits the stage-1 model's end points at s' and spends
    its capacity on the generation levels; sample it as `TruncatedConsistencyFunction(boundary, student, s')`.
    """

    estimator: AbstractEstimator
    n_points: Curriculum
    distance: AbstractDistance = L2Distance()
    weighting: AbstractWeighting = UniformWeighting()
    index_sampler: AbstractIndexSampler = UniformIndex()
    rho: float = 7.0
    boundary: AbstractDenoiser | None = None
    boundary_sigma: float | None = None

    def __check_init__(self):
        if (self.boundary is None) != (self.boundary_sigma is None):
            raise ValueError("ConsistencyLoss: give both boundary and boundary_sigma (truncated training) or neither")
        if self.boundary_sigma is not None and not self.boundary_sigma > 0:
            raise ValueError(f"ConsistencyLoss: boundary_sigma={self.boundary_sigma} must be > 0")

    def grid_pair(self, sde: AbstractSDE, n: IntScalar, n_points: IntScalar) -> tuple[Real, Real, Real, Real]:
        """(s_n, s_{n+1}, t_n, t_{n+1}) for interval n of the N-point grid of `sde`."""
        s_min, s_max = sde.scaled_sigma(sde.t_min), sde.scaled_sigma(sde.t_max)
        s_cur = karras_sigma(n, n_points, s_min, s_max, self.rho)
        s_next = karras_sigma(n + 1, n_points, s_min, s_max, self.rho)
        t_cur = time_of_sigma(sde, s_cur, n <= 0, n >= n_points - 1)
        t_next = time_of_sigma(sde, s_next, n + 1 <= 0, n + 1 >= n_points - 1)
        return s_cur, s_next, t_cur, t_next

    def draw(
        self, sde: AbstractSDE, mol: Molecule, mask: NodeMask, *, key: Key, step: IntScalar
    ) -> tuple[Int[Array, ""], Int[Array, ""], tuple[Real, Real, Real, Real], Molecule, Molecule]:
        """One draw of the loss: (n, N, (s_n, s_{n+1}, t_n, t_{n+1}), the CoM-free noise z, x_{n+1})."""
        k_index, k_noise = jr.split(key)
        n_points = jnp.asarray(self.n_points(step), jnp.int32)
        s_min, s_max = sde.scaled_sigma(sde.t_min), sde.scaled_sigma(sde.t_max)
        n = self.index_sampler(n_points, s_min, s_max, self.rho, key=k_index)
        grid = self.grid_pair(sde, n, n_points)
        noise = com_free_normal(k_noise, mask, mol.n_feat, mol.positions.dtype)
        alpha_next, sigma_next = sde.marginal(grid[3])
        return n, n_points, grid, noise, alpha_next * mol + sigma_next * noise

    def target_at(self, target, sde: AbstractSDE, n, n_points, t_cur: Real, z_cur: Molecule, mask: NodeMask):
        """The (stop-gradient) target f^-(t_n, x^_n): the target network's, or with truncated training the
        boundary model's on the intervals n <= n'."""
        f_cur = target(t_cur, z_cur, mask)
        if self.boundary is not None:
            s_min, s_max = sde.scaled_sigma(sde.t_min), sde.scaled_sigma(sde.t_max)
            on_boundary = n <= truncation_node(self.boundary_sigma, n_points, s_min, s_max, self.rho)
            f_low = jax.lax.stop_gradient(self.boundary)(t_cur, z_cur, mask)
            f_cur = jax.tree.map(lambda low, f: jnp.where(on_boundary, low, f), f_low, f_cur)
        return jax.lax.stop_gradient(f_cur)

    def loss_one(self, model, mol: Molecule, mask: NodeMask, *, key: Key, step: IntScalar, target=None):
        sde = model.sde
        target = model if target is None else target
        n, n_points, (s_cur, s_next, t_cur, t_next), noise, z_next = self.draw(sde, mol, mask, key=key, step=step)
        z_cur = jax.lax.stop_gradient(self.estimator(sde, mol, z_next, noise, mask, t_next, t_cur))
        f_next = model(t_next, z_next, mask)
        f_cur = self.target_at(target, sde, n, n_points, t_cur, z_cur, mask)
        loss = self.weighting(s_cur, s_next) * self.distance(f_next, f_cur, mask)
        dim = state_dim(mask, mol.n_feat)
        rmse = jnp.sqrt(_sq_norm(f_next, f_cur, mask) / dim)
        return loss, {"n_points": n_points.astype(jnp.float32), "rmse": rmse, "sigma": s_next}


def truncated_loss(
    objective: ConsistencyLoss,
    boundary: AbstractDenoiser,
    sigma: float,
    *,
    n_points: Curriculum | None = None,
    boundary_fraction: float | None = None,
) -> ConsistencyLoss:
    """TCM's stage 2 of a stage-1 `objective`: the same estimator, distance, weighting and rho (and N(k) unless
    `n_points` is given), trained on the intervals above s' = `sigma` only (`TruncatedIndex(sigma,
    boundary_fraction)`), with the frozen stage-1 model `boundary` giving every target at and below s'."""
    return dataclasses.replace(
        objective,
        n_points=objective.n_points if n_points is None else n_points,
        index_sampler=TruncatedIndex(sigma, boundary_fraction),
        boundary=boundary,
        boundary_sigma=sigma,
    )


def consistency_training_target(sde: AbstractSDE, x0: Molecule, noise: Molecule, t: Scalar) -> Molecule:
    """alpha(t) (x0 + s(t) noise): the CT estimate of the trajectory point at time t (for tests and tools)."""
    alpha, sigma = sde.marginal(t)
    return alpha * x0 + sigma * noise
