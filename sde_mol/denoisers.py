"""Denoisers: x0 estimates D(t, z_t) ~ E[x0 | z_t] for an `AbstractSDE`, plus the pure conversions between
the usual parametrisations of that estimate.

With z = alpha x0 + sigma eps:

* eps = (z - alpha x0) / sigma,                x0 = (z - sigma eps) / alpha,
* score = (alpha x0 - z) / sigma^2 = -eps / sigma,
* v = alpha eps - sigma x0 (Salimans & Ho 2022), x0 = (alpha z - sigma v) / (alpha^2 + sigma^2).

Consistency functions (Song et al. 2023) are denoisers too: `ConsistencyFunction` (Song's sigma_data form) and
`EpsConsistencyFunction` (EDM's eps network, for initialising a student from an EDM checkpoint) map a state at
time t to the end point of its probability-flow ODE trajectory, with f(t_min, z) = z / alpha(t_min) exactly;
`TruncatedConsistencyFunction` joins two of them at a noise level (truncated consistency models).

Networks are any callable with the EGNN signature `net(x (n_atoms, 3), h (n_atoms, n_feat), mask (n_atoms,),
t ()) -> (dx (n_atoms, 3), h_out (n_atoms, n_feat))` for ONE molecule; every network output is projected onto
the state space (CoM-free positions, zero padding) here, in the wrapper.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .molecule import Molecule, project
from .sde import AbstractSDE
from .typing import NodeMask, Real, Scalar

Network = Callable[..., tuple[Float[Array, "n_atoms 3"], Float[Array, "n_atoms n_feat"]]]


# --- pure conversions ------------------------------------------------------------------------------------


def eps_to_x0(eps: Molecule, z: Molecule, alpha: Scalar, sigma: Scalar) -> Molecule:
    return (z - sigma * eps) / alpha


def x0_to_eps(x0: Molecule, z: Molecule, alpha: Scalar, sigma: Scalar) -> Molecule:
    return (z - alpha * x0) / sigma


def x0_to_score(x0: Molecule, z: Molecule, alpha: Scalar, sigma: Scalar) -> Molecule:
    return (alpha * x0 - z) / sigma**2


def x0_to_v(x0: Molecule, z: Molecule, alpha: Scalar, sigma: Scalar) -> Molecule:
    return alpha * x0_to_eps(x0, z, alpha, sigma) - sigma * x0


def v_to_x0(v: Molecule, z: Molecule, alpha: Scalar, sigma: Scalar) -> Molecule:
    return (alpha * z - sigma * v) / (alpha**2 + sigma**2)


def _network_output(net: Network, z: Molecule, mask: NodeMask, t: Real) -> Molecule:
    dx, h = net(z.positions, z.features, mask, t)
    return project(Molecule(dx, h), mask)


# --- interface -------------------------------------------------------------------------------------------


class AbstractDenoiser(eqx.Module):
    """D(t, z_t, mask) -> x0 estimate for ONE molecule of `sde` (vmap for batches).

    `__call__` returns the x0 estimate, `eps` the noise estimate (z - alpha x0_hat) / sigma; both live in the
    state space. Samplers and objectives accept any denoiser. Subclass `AbstractX0Denoiser` when x0 is the
    native output (eps is then derived), or implement both when eps is native (`EpsDenoiser`).
    """

    sde: eqx.AbstractVar[AbstractSDE]

    @abc.abstractmethod
    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        """x0 estimate E[x0 | z_t = z]."""

    @abc.abstractmethod
    def eps(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        """Noise estimate E[eps | z_t = z] = (z - alpha x0_hat) / sigma."""


class AbstractX0Denoiser(AbstractDenoiser):
    """A denoiser whose native output is x0; `eps` is derived from it."""

    def eps(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        alpha, sigma = self.sde.marginal(t)
        return x0_to_eps(self(t, z, mask), z, alpha, sigma)


# --- final denoisers -------------------------------------------------------------------------------------


class EpsDenoiser(AbstractDenoiser):
    """EDM's parametrisation (Hoogeboom et al. 2022): the network predicts eps from the raw z_t (normalised
    features) and the raw time t (EDM: t = t_int / T); x0 = (z - sigma eps_hat) / alpha."""

    net: Network
    sde: AbstractSDE

    def eps(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        """The raw network prediction eps_hat (projected onto the state space)."""
        return _network_output(self.net, z, mask, jnp.asarray(t, jnp.float32))

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        alpha, sigma = self.sde.marginal(t)
        return eps_to_x0(self.eps(t, z, mask), z, alpha, sigma)


def karras_preconditioning(scaled_sigma: Scalar, sigma_data: Scalar) -> tuple[Real, Real, Real, Real]:
    """Karras et al. (2022, table 1) (c_skip, c_out, c_in, c_noise) at noise level sigma~ = sigma / alpha:
    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = log(s) / 4."""
    s = jnp.asarray(scaled_sigma, jnp.float32)
    total = s**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = s * sigma_data / jnp.sqrt(total)
    c_in = 1.0 / jnp.sqrt(total)
    c_noise = 0.25 * jnp.log(s)
    return c_skip, c_out, c_in, c_noise


class KarrasDenoiser(AbstractX0Denoiser):
    """Karras et al. (2022) preconditioning, for any SDE: with z~ = z / alpha = x0 + sigma~ eps and
    sigma~ = sigma / alpha, D(t, z) = c_skip z~ + c_out F(c_in z~, c_noise), all c_* at sigma~. The network
    receives c_noise = log(sigma~) / 4 as its time input."""

    net: Network
    sde: AbstractSDE
    sigma_data: float = 0.5

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        alpha, sigma = self.sde.marginal(t)
        c_skip, c_out, c_in, c_noise = karras_preconditioning(sigma / alpha, self.sigma_data)
        z_scaled = z / alpha
        out = _network_output(self.net, c_in * z_scaled, mask, c_noise)
        return c_skip * z_scaled + c_out * out


# --- consistency functions (Song et al. 2023) ------------------------------------------------------------


def consistency_coefficients(scaled_sigma: Scalar, scaled_sigma_min: Scalar, sigma_data: Scalar) -> tuple[Real, Real]:
    """Song et al. (2023, Appendix C) skip and output scales at noise level s = sigma / alpha:
    c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = sd (s - s_min) / sqrt(sd^2 + s^2).
    At s = s_min they are exactly 1 and 0 (a zero difference, no rounding); for s >> s_min they approach
    Karras' c_skip and c_out, so a network trained under `KarrasDenoiser` is a good initial F (ECT)."""
    s = jnp.asarray(scaled_sigma, jnp.float32)
    delta = s - scaled_sigma_min
    c_skip = sigma_data**2 / (delta**2 + sigma_data**2)
    c_out = sigma_data * delta / jnp.sqrt(sigma_data**2 + s**2)
    return c_skip, c_out


class ConsistencyFunction(AbstractX0Denoiser):
    """Consistency function f(t, z) = c_skip z~ + c_out F(c_in z~, c_noise) on the same networks as the
    denoisers (any callable with the EGNN signature; `net` is what training updates).

    VE view: with z~ = z / alpha = x0 + s eps and s = sigma / alpha, every SDE is the VE process x + s eps in
    z~, and f maps z~ at noise level s to the trajectory's end point at s_min = s(t_min). c_skip and c_out are
    Song's (`consistency_coefficients`), c_in = 1 / sqrt(s^2 + sd^2) and c_noise = log(s) / 4 are Karras' (as
    in `KarrasDenoiser`). For `KarrasSDE` (alpha = 1, sigma = t) this is Song's parametrisation verbatim; for
    VE the noise level is sigma(t); for a VP SDE it is sigma / alpha of the marginal. Boundary condition:
    f(t_min, z) = z / alpha(t_min) EXACTLY (c_skip = 1, c_out = 0), i.e. f(t_min, z) = z for alpha = 1.
    The network output is projected onto the state space, so the output is CoM-free whenever z is.
    """

    net: Network
    sde: AbstractSDE
    sigma_data: float = 0.5

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        alpha, sigma = self.sde.marginal(t)
        s = sigma / alpha
        c_skip, c_out = consistency_coefficients(s, self.sde.scaled_sigma(self.sde.t_min), self.sigma_data)
        _, _, c_in, c_noise = karras_preconditioning(s, self.sigma_data)
        z_scaled = z / alpha
        out = _network_output(self.net, c_in * z_scaled, mask, c_noise)
        return c_skip * z_scaled + c_out * out


class EpsConsistencyFunction(AbstractX0Denoiser):
    """A consistency function on an EDM eps network (raw z and raw t in, eps out):
    f(t, z) = z / alpha - (s - s_min) eps_hat(z, t), s = sigma / alpha.

    For s >> s_min it equals `EpsDenoiser`'s x0 = (z - sigma eps_hat) / alpha, so a student can start from an
    EDM checkpoint's weights (ECT-style initialisation); at t_min it is exactly z / alpha(t_min). Prefer
    `ConsistencyFunction` for students trained from scratch: here the output scale (s - s_min) grows with
    the noise level (to ~316 for EDM's VP schedule), which amplifies the network's error at t_max."""

    net: Network
    sde: AbstractSDE

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        alpha, sigma = self.sde.marginal(t)
        delta = sigma / alpha - self.sde.scaled_sigma(self.sde.t_min)
        eps = _network_output(self.net, z, mask, jnp.asarray(t, jnp.float32))
        return z / alpha - delta * eps


TRUNCATION_RTOL = 1e-4
"""Noise levels within this relative distance of a truncation level count as on it (grid nodes computed in
float32 land a few ulps either side of the level they were chosen at)."""


class TruncatedConsistencyFunction(AbstractX0Denoiser):
    """A truncated consistency model (TCM; Lee et al. 2025): `low`, a consistency function of the whole range
    (TCM's stage 1), at noise levels s = sigma / alpha <= `sigma` (s'), and `high`, trained only on (s', s_max]
    with `low` as its boundary condition at s' (stage 2; `objectives.consistency.ConsistencyLoss(boundary=...)`),
    above it. It is one consistency function: f(t_min, z) = low(t_min, z) = z / alpha(t_min) exactly, and it is
    CoM-free and (with EGNN parts) E(3)-equivariant because both parts are. A one-step sample reads only `high`;
    multistep samples read `low` from the first time at or below s'. Both parts live on `high.sde`."""

    low: AbstractDenoiser
    high: AbstractDenoiser
    sigma: float

    def __check_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"TruncatedConsistencyFunction: truncation level sigma={self.sigma} must be > 0")

    @property
    def sde(self) -> AbstractSDE:
        return self.high.sde

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        alpha, sigma = self.sde.marginal(t)
        above = sigma / alpha > self.sigma * (1.0 + TRUNCATION_RTOL)
        return jax.lax.cond(above, lambda: self.high(t, z, mask), lambda: self.low(t, z, mask))


# --- guidance --------------------------------------------------------------------------------------------


class GuidedDenoiser(AbstractDenoiser):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): the good
    denoiser extrapolated away from a weaker one of the same data and SDE,
    D_w(t, z) = D_bad(t, z) + w (D_good(t, z) - D_bad(t, z)), and the same for eps (both are affine in the
    network output at a fixed (alpha, sigma), so the two forms agree). w = 1 is the good denoiser; the bad one
    (a smaller or shorter-trained model) marks the directions in which the good one is still wrong.

    Guidance acts at times t_low <= t <= t_high only (guidance in a limited interval, Kynkaenniemi et al. 2024);
    elsewhere the good denoiser runs alone and the bad one is not evaluated. Both parts must share the SDE
    (`run.load.with_guide` checks it); this module lives on `good.sde`."""

    good: AbstractDenoiser
    bad: AbstractDenoiser
    weight: float
    t_low: float = 0.0
    t_high: float = float("inf")

    def __check_init__(self):
        if not (self.weight == self.weight and abs(self.weight) < float("inf")):
            raise ValueError(f"GuidedDenoiser: weight={self.weight} must be finite")
        if not self.t_low <= self.t_high:
            raise ValueError(f"GuidedDenoiser: interval ({self.t_low}, {self.t_high}) must have t_low <= t_high")

    @property
    def sde(self) -> AbstractSDE:
        return self.good.sde

    def guided_at(self, t: Scalar) -> Bool[Array, ""]:
        """Whether guidance (and so the bad denoiser) is evaluated at time t."""
        t = jnp.asarray(t)
        return (t >= self.t_low) & (t <= self.t_high)

    def eps(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        good = self.good.eps(t, z, mask)

        def guided():
            bad = self.bad.eps(t, z, mask)
            return bad + self.weight * (good - bad)

        return jax.lax.cond(self.guided_at(t), guided, lambda: good)

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        alpha, sigma = self.sde.marginal(t)
        return eps_to_x0(self.eps(t, z, mask), z, alpha, sigma)
