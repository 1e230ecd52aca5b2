"""Denoising objectives: EDM's eps-L2 (bit-for-bit the reference's training loss), Karras et al.'s EDM loss,
and a continuous-time denoising loss for any AbstractSDE.

EDM (facts §3.3): t_int ~ U{0..T}; z_t = alpha_t x + sigma_t eps with CoM-free eps;
    err = ||eps - eps_hat||^2 / ((3 + n_feat) * N_pad),  L = 0.5 err                  (t_int > 0)
    L = -log p(x, h | z_0 := z_t) with the x-error also divided by (3 + n_feat) * N_pad   (t_int = 0)
plus the KL prior and -log p(M), reported but carrying no gradient. N_pad is the padded width: EDM pads each
batch to its largest molecule; sde_mol pads to a fixed capacity (29 for QM9) for static shapes, so by default
N_pad = capacity, which rescales the loss by a constant (Adam is invariant to it). Set `n_pad` to reproduce a
specific reference batch.

The noise schedule is a fixed buffer (EDM's `gamma` table is not a parameter): every loss here reads the SDE
through `_frozen`, so a gradient taken with respect to the whole denoiser reaches the network only, whatever
filter the caller uses.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from ..data.qm9 import DatasetInfo
from ..likelihood import kl_prior, log_p_xh_given_z0
from ..molecule import Molecule, com_free_normal, n_real, project, squared_error
from ..sde import require_unit_interval
from ..typing import HasSigmaData, IntScalar, Key, NodeMask, Scalar
from .base import AbstractObjective


def _frozen(tree):
    """`tree` with gradients stopped on its array leaves (static fields untouched)."""
    dynamic, static = eqx.partition(tree, eqx.is_inexact_array)
    return eqx.combine(jax.lax.stop_gradient(dynamic), static)


def _with_frozen_sde(model):
    """The denoiser with its SDE (the noise schedule) excluded from differentiation."""
    return eqx.tree_at(lambda m: m.sde, model, _frozen(model.sde))


def eps_error(
    model, x: Molecule, mask: NodeMask, t: Scalar, eps: Molecule
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum of squared eps errors, number of state entries) of one molecule noised to time t with the given
    noise: z_t = alpha_t x + sigma_t eps, error ||eps - model.eps(t, z_t)||^2 over the real atoms. Summed over
    molecules and divided, it is the per-entry eps MSE at one noise level: with the same molecules and noise
    for two models, a paired, low-variance comparison (unlike a one-draw VLB estimate)."""
    alpha, sigma = model.sde.marginal(t)
    eps_hat = model.eps(t, project(alpha * x + sigma * eps, mask), mask)
    return squared_error(eps, eps_hat, mask), jnp.sum(mask) * (3.0 + x.n_feat)


class EDMEpsLoss(AbstractObjective):
    """EDM's training loss (eps-prediction, L2, SNR weight 1, t = 0 likelihood branch).

    `low_noise_fraction` p > 0 draws each molecule's step from U{0..floor(T t_max)} with probability p and from
    U{0..T} otherwise (t_max = `low_noise_t_max`): the low-noise levels get (1 - p) + p / t_max times their
    usual share of the gradient, the others (1 - p) times. The loss is then a reweighted one, no longer EDM's
    bound (for fine-tuning the levels that decide atom types and bonds); p = 0 is EDM's loss, draw for draw."""

    info: DatasetInfo = eqx.field(static=True)
    timesteps: int = eqx.field(static=True, default=1000)
    n_pad: int | None = eqx.field(static=True, default=None)
    low_noise_fraction: float = eqx.field(static=True, default=0.0)
    low_noise_t_max: float = eqx.field(static=True, default=0.1)

    def __check_init__(self):
        if not 0.0 <= self.low_noise_fraction <= 1.0:
            raise ValueError(f"EDMEpsLoss: low_noise_fraction {self.low_noise_fraction}: expected a share in [0, 1]")
        if not 0.0 < self.low_noise_t_max <= 1.0 or int(self.timesteps * self.low_noise_t_max) < 1:
            raise ValueError(
                f"EDMEpsLoss: low_noise_t_max {self.low_noise_t_max}: expected a time in (0, 1] of at least one "
                f"step of T = {self.timesteps}"
            )

    def terms(self, model, x: Molecule, mask: NodeMask, t_int: Array, eps: Molecule) -> dict[str, Float[Array, ""]]:
        """All per-molecule terms for a given step and noise (the fixture's loss_* keys)."""
        model = _with_frozen_sde(model)
        sde = model.sde
        require_unit_interval(sde, "EDMEpsLoss (EDM's discrete loss, t = t_int / T)")
        T = self.timesteps
        n_pad = mask.shape[0] if self.n_pad is None else self.n_pad
        t = t_int / T
        alpha_t, sigma_t = sde.marginal(t)
        z_t = project(alpha_t * x + sigma_t * eps, mask)
        eps_hat = model.eps(t, z_t, mask)
        norm = float((3 + x.n_feat) * n_pad)
        error = squared_error(eps, eps_hat, mask) / norm
        gamma_t = sde.gamma(t)
        term_0 = -log_p_xh_given_z0(x, z_t, eps, eps_hat, mask, gamma_t, self.info, x_error_norm=norm)
        t_term = jnp.where(t_int == 0, term_0, 0.5 * error)
        kl = jax.lax.stop_gradient(kl_prior(x, mask, sde.gamma(jnp.ones(()))))
        log_pn = jnp.asarray(self.info.size_log_prob(np.arange(self.info.max_n_atoms + 1)))
        neg_log_pn = -log_pn[n_real(mask).astype(jnp.int32)]
        l2 = kl + t_term
        return {
            "error": error,
            "term_0": term_0,
            "t_term": t_term,
            "kl_prior": kl,
            "l2_per_mol": l2,
            "neg_log_pn": neg_log_pn,
            "total": l2 + neg_log_pn,
        }

    def draw_step(self, key: Key) -> Array:
        """One training step index t_int in {0..T} (EDM's uniform draw, or the low-noise mixture)."""
        if self.low_noise_fraction == 0.0:
            return jr.randint(key, (), 0, self.timesteps + 1)
        kc, kt = jr.split(key)
        low = jr.bernoulli(kc, self.low_noise_fraction)
        top = jnp.where(low, int(self.timesteps * self.low_noise_t_max), self.timesteps)
        return jr.randint(kt, (), 0, top + 1)

    def loss_one(self, model, mol: Molecule, mask: NodeMask, *, key: Key, step: IntScalar, target=None):
        kt, ke = jr.split(key)
        t_int = self.draw_step(kt)
        eps = com_free_normal(ke, mask, mol.n_feat, mol.positions.dtype)
        terms = self.terms(model, mol, mask, t_int, eps)
        return terms["total"], {"l2": 0.5 * terms["error"], "kl_prior": terms["kl_prior"]}


class KarrasLoss(AbstractObjective):
    """Karras et al. (2022) EDM loss for a `KarrasDenoiser`: log sigma ~ N(p_mean, p_std^2) in the scaled noise
    level sigma/alpha, weight lambda = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, x0-prediction L2,
    averaged over state-space dimensions. The diffusion time is found from sigma by the SDE's inverse."""

    p_mean: float = eqx.field(static=True, default=-1.2)
    p_std: float = eqx.field(static=True, default=1.2)

    def loss_one(self, model: HasSigmaData, mol: Molecule, mask: NodeMask, *, key: Key, step: IntScalar, target=None):
        ks, ke = jr.split(key)
        sde = model.sde
        sigma = jnp.exp(self.p_mean + self.p_std * jr.normal(ks, ()))
        t = sde.t_from_logsnr(-2.0 * jnp.log(sigma))
        alpha_t, sigma_t = sde.marginal(t)
        eps = com_free_normal(ke, mask, mol.n_feat, mol.positions.dtype)
        z = project(alpha_t * mol + sigma_t * eps, mask)
        x0_hat = model(t, z, mask)
        sd = model.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        dim = (n_real(mask) - 1.0) * 3.0 + n_real(mask) * mol.n_feat
        loss = weight * squared_error(x0_hat, mol, mask) / dim
        return loss, {"sigma": sigma}


class ContinuousDenoisingLoss(AbstractObjective):
    """Continuous-time denoising for any AbstractSDE: t ~ U(t_min, t_max), z_t from the marginal, and an L2
    error of the chosen prediction target (eps, x0 or v), averaged over state-space dimensions."""

    target: str = eqx.field(static=True, default="eps")

    def __check_init__(self):
        if self.target not in ("eps", "x0", "v"):
            raise ValueError(f"ContinuousDenoisingLoss.target must be 'eps', 'x0' or 'v', got {self.target!r}")

    def loss_one(self, model, mol: Molecule, mask: NodeMask, *, key: Key, step: IntScalar, target=None):
        kt, ke = jr.split(key)
        sde = model.sde
        t = jr.uniform(kt, (), minval=sde.t_min, maxval=sde.t_max)
        alpha_t, sigma_t = sde.marginal(t)
        eps = com_free_normal(ke, mask, mol.n_feat, mol.positions.dtype)
        z = project(alpha_t * mol + sigma_t * eps, mask)
        x0_hat = model(t, z, mask)
        dim = (n_real(mask) - 1.0) * 3.0 + n_real(mask) * mol.n_feat
        if self.target == "x0":
            err = squared_error(x0_hat, mol, mask)
        elif self.target == "eps":
            err = squared_error(x0_hat, mol, mask) * (alpha_t / sigma_t) ** 2  # ||eps_hat - eps||^2
        else:
            err = squared_error(x0_hat, mol, mask) * (alpha_t**2 + sigma_t**2) ** 2 / sigma_t**2  # ||v_hat - v||^2
        return err / dim, {"t": t}
