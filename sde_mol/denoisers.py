"""Denoisers: x0 estimates D(t, z_t) ~ E[x0 | z_t] for an `AbstractSDE`, plus the pure conversions between
the usual parametrisations of that estimate.

With z = alpha x0 + sigma eps:

* eps = (z - alpha x0) / sigma,                x0 = (z - sigma eps) / alpha,
* score = (alpha x0 - z) / sigma^2 = -eps / sigma,
* v = alpha eps - sigma x0 (Salimans & Ho 2022), x0 = (alpha z - sigma v) / (alpha^2 + sigma^2).

Networks are any callable with the EGNN signature `net(x (n_atoms, 3), h (n_atoms, n_feat), mask (n_atoms,),
t ()) -> (dx (n_atoms, 3), h_out (n_atoms, n_feat))` for ONE molecule; every network output is projected onto
the state space (CoM-free positions, zero padding) here, in the wrapper.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .molecule import Molecule, project
from .sde import AbstractSDE
from .typing import NodeMask, Scalar

Real = Float[Array, ""]
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
