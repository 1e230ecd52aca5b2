"""diffrax glue: the PF-ODE and reverse-SDE terms of an SDE + denoiser, solver evaluation counts, and the manual
one-step solve used as the teacher of consistency distillation.

All continuous-time numerics of sde_mol go through these terms and diffrax's solvers. The state is a
`Molecule` pytree and `args` is the node mask. Integration runs backwards in time (t_max -> t_min), which
`diffrax.diffeqsolve` handles by flipping time; `teacher_step` flips time the same way, so one manual step
equals `diffeqsolve` over the same interval with the same solver.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from .denoisers import AbstractDenoiser
from .molecule import Molecule, project
from .sde import AbstractSDE
from .typing import Key, NodeMask, Scalar


def solver_evals(solver: dfx.AbstractSolver) -> tuple[int, int]:
    """(vector-field evaluations per attempted step, evaluations at initialisation) of an explicit solver on
    an ODE: a Runge-Kutta tableau with S stages costs S per step, or S - 1 plus one at the start when the
    last stage is reused as the next first stage (FSAL: Tsit5, Dopri5)."""
    if isinstance(solver, dfx.AbstractERK):
        fsal = int(solver.tableau.fsal)
        return solver.tableau.num_stages - fsal, fsal
    if isinstance(solver, dfx.Euler):
        return 1, 0
    raise ValueError(f"no evaluation count for solver {type(solver).__name__}")


# --- vector fields ---------------------------------------------------------------------------------------


class _PFODEField(eqx.Module):
    denoiser: AbstractDenoiser
    sde: AbstractSDE

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        return self.sde.pf_ode_drift(self.denoiser, t, z, mask)


class _ReverseDriftField(eqx.Module):
    denoiser: AbstractDenoiser
    sde: AbstractSDE

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        return self.sde.reverse_drift(self.denoiser, t, z, mask)


class _DiffusionField(eqx.Module):
    """g(t) times the identity, acting on a Molecule-shaped (already projected) Brownian increment."""

    sde: AbstractSDE

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> lx.DiagonalLinearOperator:
        _, g2 = self.sde.drift_coeffs(t)
        g = jnp.sqrt(g2)
        return lx.DiagonalLinearOperator(jax.tree.map(lambda a: jnp.full_like(a, g), z))


class ProjectedBrownianPath(dfx.AbstractPath):
    """A Brownian motion on the state space: the increments of `path` (Molecule-shaped) projected onto
    CoM-free positions and real atoms. Projection of an isotropic Brownian motion onto a linear subspace is
    the Brownian motion of that subspace."""

    path: dfx.AbstractBrownianPath
    mask: NodeMask

    @property
    def t0(self):
        return self.path.t0

    @property
    def t1(self):
        return self.path.t1

    def evaluate(self, t0: Scalar, t1: Scalar | None = None, left: bool = True) -> Molecule:
        return project(self.path.evaluate(t0, t1, left), self.mask)


def pf_ode_term(denoiser: AbstractDenoiser, sde: AbstractSDE) -> dfx.ODETerm:
    """The probability-flow ODE dz/dt = f z - g^2/2 score as a diffrax term; pass the node mask as `args`."""
    return dfx.ODETerm(_PFODEField(denoiser, sde))


def reverse_sde_terms(
    denoiser: AbstractDenoiser,
    sde: AbstractSDE,
    mask: NodeMask,
    n_feat: int,
    *,
    key: Key,
    brownian_tol: float | None = None,
) -> dfx.MultiTerm:
    """The reverse-time SDE dz = (f z - g^2 score) dt + g dW_bar, with CoM-free, masked Brownian increments.

    `brownian_tol=None` uses `UnsafeBrownianPath` (fresh increments per step: fixed grids only); a float uses
    a `VirtualBrownianTree` on [t_min, t_max] with that tolerance (must be well below the smallest step).
    Pass the node mask as `args` to `diffeqsolve`.
    """
    shape = jax.eval_shape(lambda: Molecule(jnp.zeros((mask.shape[0], 3)), jnp.zeros((mask.shape[0], n_feat))))
    if brownian_tol is None:
        brownian = dfx.UnsafeBrownianPath(shape=shape, key=key)
    else:
        brownian = dfx.VirtualBrownianTree(sde.t_min, sde.t_max, tol=brownian_tol, shape=shape, key=key)
    return dfx.MultiTerm(
        dfx.ODETerm(_ReverseDriftField(denoiser, sde)),
        dfx.ControlTerm(_DiffusionField(sde), ProjectedBrownianPath(brownian, mask)),
    )


# --- manual stepping -------------------------------------------------------------------------------------


class _TimeFlipped(dfx.AbstractTerm):
    """`term` seen in time direction * t (direction = +-1): what diffeqsolve does to every term so that its
    solvers always step forwards."""

    term: dfx.AbstractTerm
    direction: Float[Array, ""]

    def _interval(self, t0, t1):
        forward = self.direction > 0
        return jnp.where(forward, t0, -t1), jnp.where(forward, t1, -t0)

    def vf(self, t, y, args):
        return self.term.vf(t * self.direction, y, args)

    def contr(self, t0, t1, **kwargs):
        control = self.term.contr(*self._interval(t0, t1), **kwargs)
        return jax.tree.map(lambda c: self.direction * c, control)

    def prod(self, vf, control):
        return self.term.prod(vf, control)

    def vf_prod(self, t, y, args, control):
        return self.term.vf_prod(t * self.direction, y, args, control)

    def is_vf_expensive(self, t0, t1, y, args):
        return self.term.is_vf_expensive(*self._interval(t0, t1), y, args)


def teacher_step(
    solver: dfx.AbstractSolver, term: dfx.AbstractTerm, t0: Scalar, t1: Scalar, z: Molecule, args: NodeMask
) -> Molecule:
    """One step of `solver` from t0 to t1 (either direction) via `solver.init` / `solver.step`.

    Time is flipped exactly as `diffeqsolve` flips it when t1 < t0, so the result equals
    `diffeqsolve(term, solver, t0, t1, ..., stepsize_controller=StepTo([t0, t1]))`.
    """
    t0 = jnp.asarray(t0, jnp.float32)
    t1 = jnp.asarray(t1, jnp.float32)
    direction = jnp.where(t0 < t1, 1.0, -1.0).astype(jnp.float32)
    flipped = _TimeFlipped(term, direction)
    s0, s1 = t0 * direction, t1 * direction
    state = solver.init(flipped, s0, s1, z, args)
    z1, _, _, _, _ = solver.step(flipped, s0, s1, z, args, state, made_jump=False)
    return z1
