"""Diffusion processes defined by their Gaussian marginals.

Every process here is linear with a Gaussian transition, q(z_t | x0) = N(alpha(t) x0, sigma(t)^2 I) on the
molecule state space (CoM-free positions, masked features). A subclass gives only `marginal(t) -> (alpha,
sigma)` and its time domain [t_min, t_max]; everything else is derived once on `AbstractSDE`
(Song et al. 2021, Kingma et al. 2021):

* logsnr(t) = log(alpha^2 / sigma^2), gamma(t) = -logsnr(t) (EDM's gamma).
* The forward SDE dz = f(t) z dt + g(t) dW with f = d log(alpha)/dt and g^2 = d(sigma^2)/dt - 2 f sigma^2,
  both read off the marginal by `jax.jvp` (forward-mode derivative in t).
* Transitions q(z_t | z_s), s < t: alpha_{t|s} = alpha_t / alpha_s, sigma^2_{t|s} = sigma_t^2 -
  alpha_{t|s}^2 sigma_s^2.
* The probability-flow ODE dz/dt = f z - g^2/2 * score and the reverse-time SDE drift f z - g^2 * score, with the
  score of a denoiser's x0 estimate, score = (alpha x0_hat - z) / sigma^2 (Tweedie), in the state space.

Final classes: `PolynomialVPSDE` (EDM's `polynomial_2`, continuous), `DiscreteVPSDE` (EDM's exact float32
lookup table), `CosineVPSDE`, `VESDE` and `KarrasSDE` (alpha = 1, sigma = t). `run.build.build_sde_from` is the one
name -> SDE map.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .molecule import Molecule, com_free_normal, normal_log_prob, project
from .schedules import edm_gamma_table
from .typing import Key, NodeMask, Real, Scalar

Denoiser = Callable[..., Molecule]  # (t, z, mask) -> x0 estimate; any AbstractDenoiser


def _as_time(t: Scalar) -> Float[Array, ""]:
    return jnp.asarray(t, dtype=jnp.float32)


class AbstractSDE(eqx.Module):
    """A diffusion process q(z_t | x0) = N(alpha(t) x0, sigma(t)^2 I), t in [t_min, t_max].

    Time runs from data (t_min, small noise) to noise (t_max, where z_t is close to the prior). Subclasses
    implement `marginal` only; alpha must be positive and sigma / alpha increasing on the time domain.
    """

    t_min: eqx.AbstractVar[float]
    t_max: eqx.AbstractVar[float]

    @abc.abstractmethod
    def marginal(self, t: Scalar) -> tuple[Real, Real]:
        """(alpha(t), sigma(t)) of q(z_t | x0) = N(alpha x0, sigma^2 I)."""

    @property
    def time_resolution(self) -> int | None:
        """How many distinct time steps the process resolves on [t_min, t_max]: None in continuous time, T for a
        process defined on a table of T steps (a chain of more steps than T would reuse table entries)."""
        return None

    def continuous_twin(self) -> "AbstractSDE":
        """The same process in continuous time (host-side): itself, unless it is defined on a table."""
        return self

    # --- derived quantities -------------------------------------------------------------------------------

    def logsnr(self, t: Scalar) -> Real:
        """log SNR = log(alpha^2 / sigma^2), decreasing in t."""
        alpha, sigma = self.marginal(t)
        return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

    def gamma(self, t: Scalar) -> Real:
        """EDM's gamma = -log SNR."""
        return -self.logsnr(t)

    def scaled_sigma(self, t: Scalar) -> Real:
        """sigma / alpha: the noise level of z / alpha = x0 + (sigma / alpha) eps (Karras' sigma)."""
        alpha, sigma = self.marginal(t)
        return sigma / alpha

    def drift_coeffs(self, t: Scalar) -> tuple[Real, Real]:
        """(f(t), g(t)^2) of the forward SDE dz = f z dt + g dW, from the marginal by forward-mode AD:
        f = alpha'/alpha, g^2 = (sigma^2)' - 2 f sigma^2."""
        t = _as_time(t)
        (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(self.marginal, (t,), (jnp.ones_like(t),))
        f = d_alpha / alpha
        g2 = 2.0 * sigma * (d_sigma - f * sigma)
        return f, g2

    def transition(self, s: Scalar, t: Scalar) -> tuple[Real, Real]:
        """(alpha_{t|s}, sigma^2_{t|s}) of q(z_t | z_s) = N(alpha_{t|s} z_s, sigma^2_{t|s} I) for s < t."""
        alpha_s, sigma_s = self.marginal(s)
        alpha_t, sigma_t = self.marginal(t)
        alpha_ts = alpha_t / alpha_s
        return alpha_ts, sigma_t**2 - (alpha_ts * sigma_s) ** 2

    def t_from_logsnr(self, logsnr: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """Invert logsnr(t) on [t_min, t_max] by bisection (60 halvings, elementwise; result clipped to the
        domain). Used to map noise-level grids back to time."""
        target = jnp.asarray(logsnr, jnp.float32)
        flat = target.reshape(-1)

        def invert(value: Float[Array, ""]) -> Float[Array, ""]:
            def halve(_, bounds):
                lo, hi = bounds
                mid = 0.5 * (lo + hi)
                above = self.logsnr(mid) > value  # logsnr decreases: the root lies later than mid
                return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

            lo = jnp.asarray(self.t_min, jnp.float32)
            hi = jnp.asarray(self.t_max, jnp.float32)
            lo, hi = jax.lax.fori_loop(0, 60, halve, (lo, hi))
            return 0.5 * (lo + hi)

        return jax.vmap(invert)(flat).reshape(target.shape)

    # --- sampling from the process ------------------------------------------------------------------------

    def perturb(self, x0: Molecule, mask: NodeMask, t: Scalar, *, key: Key) -> tuple[Molecule, Molecule]:
        """Draw z_t = alpha x0 + sigma eps with eps standard normal on the state space; returns (z_t, eps).
        `x0` must be in the state space (CoM-free positions, zero padding)."""
        alpha, sigma = self.marginal(t)
        eps = com_free_normal(key, mask, x0.n_feat)
        return alpha * x0 + sigma * eps, eps

    def prior(self, mask: NodeMask, n_feat: int, *, key: Key) -> Molecule:
        """z_{t_max} ~ N(0, sigma(t_max)^2 I) on the state space (alpha(t_max) x0 is neglected: small for VP
        processes, and for VE / Karras sigma_max is chosen far above the data scale)."""
        _, sigma = self.marginal(self.t_max)
        return sigma * com_free_normal(key, mask, n_feat)

    def prior_log_prob(self, z: Molecule, mask: NodeMask) -> Real:
        """log N(z; 0, sigma(t_max)^2 I) on the state space ((M-1)*3 + M*n_feat dimensions)."""
        _, sigma = self.marginal(self.t_max)
        return normal_log_prob(z, mask, sigma)

    # --- drifts for samplers ------------------------------------------------------------------------------

    def score(self, denoiser: Denoiser, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        """grad log p_t(z) from the denoiser's x0 estimate: (alpha x0_hat - z) / sigma^2, in the state space."""
        alpha, sigma = self.marginal(t)
        x0 = denoiser(t, z, mask)
        return project((alpha * x0 - z) / sigma**2, mask)

    def pf_ode_drift(self, denoiser: Denoiser, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        """Probability-flow ODE dz/dt = f z - g^2/2 * score: same marginals as the SDE, deterministic."""
        f, g2 = self.drift_coeffs(t)
        return f * z - (0.5 * g2) * self.score(denoiser, t, z, mask)

    def reverse_drift(self, denoiser: Denoiser, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        """Drift of the reverse-time SDE dz = (f z - g^2 score) dt + g dW_bar, integrated from t_max down."""
        f, g2 = self.drift_coeffs(t)
        return f * z - g2 * self.score(denoiser, t, z, mask)


# ---------------------------------------------------------------------------------------------------------
# EDM's ancestral quantities, written in gamma as the reference computes them (VP processes only)


def require_unit_interval(sde: AbstractSDE, what: str) -> None:
    """Raise if `sde` does not run on t in [0, 1]: EDM's discrete formulas (t = t_int / T) assume it, and
    another interval (e.g. `KarrasSDE`, t = sigma) would silently be sampled on the wrong times."""
    if (sde.t_min, sde.t_max) != (0.0, 1.0):
        raise ValueError(
            f"{what} needs an SDE on t in [0, 1]; {type(sde).__name__} runs on [{sde.t_min}, {sde.t_max}] "
            "(use a continuous-time objective, e.g. ContinuousDenoisingLoss or KarrasLoss)"
        )


def vp_sigma2_t_given_s(gamma_s: Float[Array, "*shape"], gamma_t: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """sigma^2_{t|s} = 1 - alpha_t^2 / alpha_s^2 = -expm1(softplus(gamma_s) - softplus(gamma_t)) (VP)."""
    return -jnp.expm1(jax.nn.softplus(gamma_s) - jax.nn.softplus(gamma_t))


def vp_alpha_t_given_s(gamma_s: Float[Array, "*shape"], gamma_t: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """alpha_{t|s} = alpha_t / alpha_s = exp((log sigmoid(-gamma_t) - log sigmoid(-gamma_s)) / 2) (VP)."""
    return jnp.exp(0.5 * (jax.nn.log_sigmoid(-gamma_t) - jax.nn.log_sigmoid(-gamma_s)))


def _vp_from_gamma(gamma: Real) -> tuple[Real, Real]:
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


# ---------------------------------------------------------------------------------------------------------
# Final processes


class PolynomialVPSDE(AbstractSDE):
    """Continuous-time VP process of EDM's `polynomial_<power>` schedule on t in [0, 1]:
    alpha^2(t) = (1 - 2s)(1 - t^power)^2 + s, sigma^2 = 1 - alpha^2 (s = `precision`).

    Equals EDM's table at t = i / T up to the table's float32 cast, except at t = 1 where the table's
    step-ratio clip makes alpha^2 = s + (1 - 2s) * 0.001 * alpha^2(1 - 1/T) instead of s.
    """

    power: float = 2.0
    precision: float = 1e-5

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return 1.0

    def marginal(self, t: Scalar) -> tuple[Real, Real]:
        t = _as_time(t)
        s = self.precision
        tp = t**self.power
        alpha2 = (1.0 - 2.0 * s) * (1.0 - tp) ** 2 + s
        sigma2 = (1.0 - 2.0 * s) * tp * (2.0 - tp) + s  # = 1 - alpha2 without the cancellation near t = 0
        return jnp.sqrt(alpha2), jnp.sqrt(sigma2)


class DiscreteVPSDE(AbstractSDE):
    """EDM's discrete VP process: gamma(t) = table[round(t T)] from a float32 table of length T + 1, then
    alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)), exactly as the reference looks it up.

    The lookup is piecewise constant, so its time derivative (needed by the PF-ODE and the reverse SDE) is
    taken from the piecewise-linear interpolation of the table (a straight-through derivative): values are
    EDM's, rates are those of the interpolated schedule. Continuous-time solvers are therefore consistent
    only on grids whose nodes are table knots (e.g. uniform grids with n_steps dividing T); for other grids
    use `PolynomialVPSDE`, the same schedule in continuous time (`continuous_twin()`).
    """

    gamma_table: Float[Array, " n_table"]
    power: float | None = eqx.field(static=True)
    precision: float | None = eqx.field(static=True)

    def __init__(
        self,
        gamma_table: Float[Array, " n_table"] | Float[np.ndarray, " n_table"],
        power: float | None = None,
        precision: float | None = None,
    ):
        """`power`, `precision`: the polynomial schedule the table was built from (None: unknown, so the table
        has no continuous twin)."""
        self.gamma_table = jnp.asarray(gamma_table, dtype=jnp.float32)
        self.power = power
        self.precision = precision

    @classmethod
    def edm_polynomial(cls, n_timesteps: int = 1000, power: float = 2.0, precision: float = 1e-5) -> "DiscreteVPSDE":
        """EDM's `polynomial_2` (by default) table, built in float64 and cast to float32."""
        return cls(edm_gamma_table(n_timesteps, power, precision), power, precision)

    @property
    def n_timesteps(self) -> int:
        return self.gamma_table.shape[0] - 1

    @property
    def time_resolution(self) -> int:
        return self.n_timesteps

    def continuous_twin(self) -> "PolynomialVPSDE":
        """`PolynomialVPSDE` of the table's power and precision: the same schedule in continuous time (a network
        trained at the knots i / T receives the same raw time t). Checks that the table is that schedule: its
        gamma at the knots i / T, i < T, within 1e-3 relative (the last knot carries EDM's clip)."""
        if self.power is None or self.precision is None:
            raise ValueError("a DiscreteVPSDE built from a bare table (no power, precision) has no continuous twin")
        twin = PolynomialVPSDE(self.power, self.precision)
        n = self.n_timesteps
        knots = jnp.asarray(np.arange(n, dtype=np.float32) / np.float32(n))
        table = np.asarray(self.gamma_table[:n], np.float64)
        gap = float(np.max(np.abs(np.asarray(jax.vmap(twin.gamma)(knots), np.float64) - table)))
        if gap > 1e-3 * max(1.0, float(np.max(np.abs(table)))):
            raise ValueError(
                f"the discrete table differs from its continuous twin PolynomialVPSDE(power={self.power}, "
                f"precision={self.precision}) by {gap:.3g} in gamma at the knots i / T"
            )
        return twin

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return 1.0

    def lookup(self, t: Scalar) -> Real:
        """gamma(t) = table[round(t T)] (round half to even), with the interpolated table's derivative."""
        n = self.n_timesteps
        u = _as_time(t) * n
        nearest = self.gamma_table[jnp.clip(jnp.round(u), 0, n).astype(jnp.int32)]
        left = jnp.clip(jnp.floor(u), 0, n - 1).astype(jnp.int32)
        g0, g1 = self.gamma_table[left], self.gamma_table[left + 1]
        linear = g0 + (u - left) * (g1 - g0)
        return nearest + (linear - jax.lax.stop_gradient(linear))

    def marginal(self, t: Scalar) -> tuple[Real, Real]:
        return _vp_from_gamma(self.lookup(t))


class CosineVPSDE(AbstractSDE):
    """Cosine VP schedule (Nichol & Dhariwal 2021): alpha(t) = cos(phi(t)) / cos(phi(0)),
    phi(t) = (t + s) / (1 + s) * pi / 2. alpha(1) = 0, so the domain stops at t_max < 1; t_min > 0 keeps
    sigma > 0 (defaults: sigma(t_min) ~ 3e-3, alpha(t_max) ~ 1.6e-3, similar to EDM's end points)."""

    s: float = 0.008
    t_min: float = 2e-4
    t_max: float = 0.999

    def marginal(self, t: Scalar) -> tuple[Real, Real]:
        t = _as_time(t)
        phi0 = self.s / (1.0 + self.s) * (jnp.pi / 2)
        phi = (t + self.s) / (1.0 + self.s) * (jnp.pi / 2)
        cos0 = jnp.cos(phi0)
        alpha = jnp.cos(phi) / cos0
        # 1 - alpha^2 = (cos^2 phi0 - cos^2 phi) / cos^2 phi0 = sin(phi - phi0) sin(phi + phi0) / cos^2 phi0
        sigma2 = jnp.sin(phi - phi0) * jnp.sin(phi + phi0) / cos0**2
        return alpha, jnp.sqrt(sigma2)


class VESDE(AbstractSDE):
    """Variance-exploding process (Song et al. 2021): alpha = 1, sigma(t) = sigma_min (sigma_max /
    sigma_min)^t on t in [0, 1]."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return 1.0

    def marginal(self, t: Scalar) -> tuple[Real, Real]:
        t = _as_time(t)
        log_ratio = jnp.log(jnp.float32(self.sigma_max) / jnp.float32(self.sigma_min))
        return jnp.ones_like(t), self.sigma_min * jnp.exp(t * log_ratio)


class KarrasSDE(AbstractSDE):
    """Karras et al. (2022) EDM process: alpha = 1, sigma(t) = t on [sigma_min, sigma_max]. Its PF-ODE is
    dz/dt = (z - x0_hat) / t."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def marginal(self, t: Scalar) -> tuple[Real, Real]:
        t = _as_time(t)
        return jnp.ones_like(t), t
