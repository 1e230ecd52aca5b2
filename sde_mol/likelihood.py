"""Likelihoods: EDM's variational bound (nats per molecule) and the exact PF-ODE likelihood.

EDM's bound for one molecule with normalised state x = [positions | features] (facts §3.4-3.5):

    NLL = KL(q(z_T|x) || N(0, I)) + T * L_t + (-log Z_0) + L_0 - Delta log p_x - log p(M)

with L_t = 0.5 (SNR(s)/SNR(t) - 1) ||eps - eps_hat||^2 for t ~ U{1..T}, s = t - 1; -log Z_0 the position
Gaussian's constant with sigma_x = exp(gamma_0 / 2); L_0 = -log p(x, h | z_0) with the features' discretised
Gaussian likelihood (bins of width 1 in data units, computed from z_0 itself) and the positions' Gaussian error.
Delta log p_x = -(M-1) * 3 * log(norm_x) is 0 for QM9 (norm_x = 1).
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.scipy.special import logsumexp, ndtr
from jaxtyping import Array, Bool, Float, Int

from .data.qm9 import DatasetInfo
from .molecule import Molecule, com_dof, com_free_normal, n_real, normal_log_prob, project
from .sde import require_unit_interval
from .typing import Key, NodeMask, Scalar

LOG_2PI = float(np.log(2 * np.pi))


def _sigma_from_gamma(gamma):
    return jnp.sqrt(jax.nn.sigmoid(gamma)), jnp.sqrt(jax.nn.sigmoid(-gamma))


def kl_prior(x: Molecule, mask: NodeMask, gamma_T: Scalar) -> Float[Array, ""]:
    """KL(q(z_T | x) || N(0, I)) on the state space: CoM-free positions ((M-1)*3 dims) and M * n_feat features."""
    sigma_T, alpha_T = _sigma_from_gamma(gamma_T)
    m = mask[:, None]
    mu_h = alpha_T * x.features
    kl_h = jnp.sum(jnp.where(m, jnp.log(1.0 / sigma_T) + 0.5 * (sigma_T**2 + mu_h**2) - 0.5, 0.0))
    d = com_dof(mask)
    mu_x = alpha_T * x.positions
    kl_x = d * jnp.log(1.0 / sigma_T) + 0.5 * (d * sigma_T**2 + jnp.sum(jnp.where(m, mu_x**2, 0.0))) - 0.5 * d
    return kl_h + kl_x


def neg_log_constants(mask: NodeMask, gamma_0: Scalar) -> Float[Array, ""]:
    """-log Z_0 = -D * (-0.5 gamma_0 - 0.5 log 2 pi), D = (M-1)*3: the position Gaussian's normaliser."""
    return -com_dof(mask) * (-0.5 * gamma_0 - 0.5 * LOG_2PI)


def log_p_features_given_z0(
    x: Molecule, z0: Molecule, mask: NodeMask, gamma_0: Scalar, info: DatasetInfo
) -> Float[Array, ""]:
    """log p(h | z_0) of EDM: discretised Gaussians around z_0 (unnormalised to data units) with bins of
    width 1; categorical channels normalised over classes. Uses z_0 itself, not the network output."""
    sigma_0, _ = _sigma_from_gamma(gamma_0)
    _, n_cat, n_int = info.norm_values
    _, b_cat, b_int = info.norm_biases
    k = info.n_types
    m = mask.astype(z0.features.dtype)
    cat_true = x.features[:, :k] * n_cat + b_cat  # one-hot in data units
    u = z0.features[:, :k] * n_cat + b_cat - 1.0
    s_cat = sigma_0 * n_cat
    log_p_unnorm = jnp.log(ndtr((u + 0.5) / s_cat) - ndtr((u - 0.5) / s_cat) + 1e-10)
    log_p_cat = log_p_unnorm - logsumexp(log_p_unnorm, axis=-1, keepdims=True)
    total = jnp.sum(log_p_cat * cat_true * m[:, None])
    if info.include_charges:
        z_true = x.features[:, k] * n_int + b_int
        z_hat = z0.features[:, k] * n_int + b_int
        s_int = sigma_0 * n_int
        lp = jnp.log(ndtr((z_true - z_hat + 0.5) / s_int) - ndtr((z_true - z_hat - 0.5) / s_int) + 1e-10)
        total = total + jnp.sum(lp * m)
    return total


def log_p_xh_given_z0(
    x: Molecule,
    z0: Molecule,
    eps: Molecule,
    eps_hat: Molecule,
    mask: NodeMask,
    gamma_0: Scalar,
    info: DatasetInfo,
    *,
    x_error_norm: Scalar = 1.0,
) -> Float[Array, ""]:
    """EDM's log p(x, h | z_0) without the position constant: -0.5 ||eps_x - eps_hat_x||^2 / x_error_norm
    plus the feature likelihood. Training divides the position error by (3 + n_feat) * N_pad."""
    err_x = jnp.sum(jnp.where(mask[:, None], (eps.positions - eps_hat.positions) ** 2, 0.0))
    return -0.5 * err_x / x_error_norm + log_p_features_given_z0(x, z0, mask, gamma_0, info)


def vlb_terms(
    denoiser,
    x: Molecule,
    mask: NodeMask,
    info: DatasetInfo,
    t_int: Array,
    eps: Molecule,
    eps0: Molecule,
    *,
    timesteps: int = 1000,
) -> dict[str, Float[Array, ""]]:
    """Every term of EDM's NLL for one molecule at a given step t_int in 1..T and given noises (eval mode)."""
    sde = denoiser.sde
    require_unit_interval(sde, "EDM's variational bound (t = t_int / T)")
    T = timesteps
    t = t_int / T
    s = (t_int - 1) / T
    gamma_t, gamma_s = sde.gamma(t), sde.gamma(s)
    gamma_0, gamma_T = sde.gamma(jnp.zeros(())), sde.gamma(jnp.ones(()))
    alpha_t, sigma_t = sde.marginal(t)
    z_t = project(alpha_t * x + sigma_t * eps, mask)
    eps_hat = denoiser.eps(t, z_t, mask)
    d = eps - eps_hat
    error = jnp.sum(jnp.where(mask[:, None], d.positions**2, 0.0)) + jnp.sum(
        jnp.where(mask[:, None], d.features**2, 0.0)
    )
    snr_weight = jnp.expm1(gamma_t - gamma_s)
    loss_t = 0.5 * snr_weight * error
    alpha_0, sigma_0 = sde.marginal(jnp.zeros(()))
    z0 = project(alpha_0 * x + sigma_0 * eps0, mask)
    eps_hat0 = denoiser.eps(jnp.zeros(()), z0, mask)
    loss_0 = -log_p_xh_given_z0(x, z0, eps0, eps_hat0, mask, gamma_0, info)
    kl = kl_prior(x, mask, gamma_T)
    const = neg_log_constants(mask, gamma_0)
    neg_log_pxh = kl + T * loss_t + const + loss_0
    neg_log_pn = -jnp.asarray(info.size_log_prob(np.arange(info.max_n_atoms + 1)))[n_real(mask).astype(jnp.int32)]
    return {
        "error": error,
        "snr_weight": snr_weight,
        "loss_t": loss_t,
        "kl_prior": kl,
        "neg_log_constants": const,
        "loss_term_0": loss_0,
        "neg_log_pxh": neg_log_pxh,
        "neg_log_pn": neg_log_pn,
        "nll": neg_log_pxh + neg_log_pn,
    }


def vlb_nll(
    denoiser, x: Molecule, mask: NodeMask, info: DatasetInfo, *, key: Key, timesteps: int = 1000
) -> Float[Array, ""]:
    """Unbiased one-sample estimate of EDM's NLL (nats per molecule, including -log p(M))."""
    kt, ke, ke0 = jr.split(key, 3)
    t_int = jr.randint(kt, (), 1, timesteps + 1)
    eps = com_free_normal(ke, mask, x.n_feat)
    eps0 = com_free_normal(ke0, mask, x.n_feat)
    return vlb_terms(denoiser, x, mask, info, t_int, eps, eps0, timesteps=timesteps)["nll"]


def _nll_batch(denoiser, positions, features, masks, keys, info: DatasetInfo, timesteps: int):
    one = lambda x, h, m, k: vlb_nll(denoiser, Molecule(x, h), m, info, key=k, timesteps=timesteps)  # noqa: E731
    return jax.vmap(one)(positions, features, masks, keys)


_nll_batch_jit = eqx.filter_jit(_nll_batch)


def dataset_nll(
    denoiser,
    positions: Float[np.ndarray, "n n_atoms 3"],
    features: Float[np.ndarray, "n n_atoms n_feat"],
    masks: Bool[np.ndarray, "n n_atoms"],
    info: DatasetInfo,
    *,
    key: Key,
    batch_size: int = 200,
    timesteps: int = 1000,
) -> Float[np.ndarray, " n"]:
    """`vlb_nll` of n encoded molecules (host arrays, e.g. `data.loader.encode_split`), molecule i with
    `fold_in(key, i)`, in fixed-shape batches (one compilation; the last batch is filled up and trimmed).
    Non-finite values are an error, never averaged."""
    n, b = positions.shape[0], min(batch_size, positions.shape[0])
    out = []
    for lo in range(0, n, b):
        idx = np.minimum(np.arange(lo, lo + b), n - 1)
        keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.asarray(idx))
        nll = _nll_batch_jit(
            denoiser, jnp.asarray(positions[idx]), jnp.asarray(features[idx]), jnp.asarray(masks[idx]), keys, info,
            timesteps,
        )  # fmt: skip
        out.append(np.asarray(nll)[: min(b, n - lo)])
    nll = np.concatenate(out)
    if not np.all(np.isfinite(nll)):
        raise FloatingPointError(f"non-finite NLL for {int(np.sum(~np.isfinite(nll)))} of {n} molecules")
    return nll


# ------------------------------------------------------------------------------------ PF-ODE likelihood


def _flat_dim(mask: NodeMask, n_feat: int) -> int:
    return mask.shape[0] * (3 + n_feat)


def pf_ode_log_prob(
    denoiser,
    x: Molecule,
    mask: NodeMask,
    *,
    key: Key | None = None,
    t0: float | None = None,
    t1: float | None = None,
    solver: dfx.AbstractSolver | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    exact_trace: bool = True,
    max_steps: int = 4096,
) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """log p_0(x) by the probability-flow ODE and the instantaneous change of variables, on the state space
    (CoM-free positions and real-atom features; padded entries are zero and carry no density).

    d/dt log p_t(z_t) = -div f(z_t, t), so log p_0(x) = log p_T(z_T) + int_0^T div f dt. The divergence is the
    trace of the Jacobian of the drift restricted to the state space; the drift is already projected onto it,
    so the full Jacobian's trace over real-atom channels equals it (exact: one JVP per real dimension;
    Hutchinson: one JVP with a Rademacher probe in the state space). Returns (log p_0(x), number of steps)."""
    sde = denoiser.sde
    t0 = sde.t_min if t0 is None else t0
    t1 = sde.t_max if t1 is None else t1
    n_feat = x.n_feat
    solver = dfx.Tsit5() if solver is None else solver
    m = mask[:, None].astype(x.positions.dtype)
    probe = None
    if not exact_trace:
        if key is None:
            raise ValueError("pf_ode_log_prob: Hutchinson's estimator (exact_trace=False) needs a key")
        kx, kh = jr.split(key)
        px = jr.rademacher(kx, x.positions.shape, x.positions.dtype)
        ph = jr.rademacher(kh, x.features.shape, x.features.dtype)
        probe = project(Molecule(px, ph), mask)

    def drift(t, z):
        return sde.pf_ode_drift(denoiser, t, z, mask)

    def divergence(t, z):
        if probe is not None:
            _, jv = jax.jvp(lambda zz: drift(t, zz), (z,), (probe,))
            return jnp.sum(jv.positions * probe.positions) + jnp.sum(jv.features * probe.features)
        # exact trace: basis vectors of the ambient (padded) space; padded directions are projected to zero by
        # the drift, and the CoM direction is not in the range of the projected drift, so the trace over the
        # ambient real-atom channels minus the CoM directions equals the state-space trace. We use the
        # projection P (idempotent): tr(P J P) computed from JVPs with P e_i.
        n = mask.shape[0]
        eye = jnp.eye(n * (3 + n_feat), dtype=z.positions.dtype).reshape(-1, n, 3 + n_feat)

        def one(e):
            v = project(Molecule(e[:, :3], e[:, 3:]), mask)
            _, jv = jax.jvp(lambda zz: drift(t, zz), (z,), (v,))
            jv = project(jv, mask)
            return jnp.sum(jv.positions * e[:, :3] * m) + jnp.sum(jv.features * e[:, 3:] * m)

        return jnp.sum(jax.lax.map(one, eye, batch_size=64))

    def vf(t, state, args):
        z, _ = state
        return drift(t, z), divergence(t, z)

    term = dfx.ODETerm(vf)
    sol = dfx.diffeqsolve(
        term,
        solver,
        t0=t0,
        t1=t1,
        dt0=(t1 - t0) / 64,
        y0=(project(x, mask), jnp.zeros((), x.positions.dtype)),
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
    )
    z_T, int_div = jax.tree.map(lambda a: a[-1], sol.ys)
    _, sigma_T = sde.marginal(jnp.asarray(t1))
    log_p_T = normal_log_prob(z_T, mask, sigma_T)
    return log_p_T + int_div, sol.stats["num_steps"]
