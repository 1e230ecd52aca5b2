"""Time grids and noise-schedule tables, as pure functions.

* `uniform_grid`: evenly spaced times, e.g. EDM's t = i / T.
* `karras_sigma_grid`: Karras et al. (2022, eq. 5) rho-spaced noise levels from sigma_max down to sigma_min.
* `time_grid`: a decreasing grid in *an SDE's own time* from t_max to t_min, either uniform in t or
  rho-spaced in the SDE's scaled noise level sigma(t) / alpha(t) (mapped back to t by the SDE).
* `edm_polynomial_alphas2` / `edm_gamma_table`: EDM's `polynomial_2` schedule exactly as the reference builds
  it (float64 numpy, clipped step ratios, precision squeeze), returned as the float32 gamma table that every
  EDM lookup uses (facts section 3.1).
* Consistency-model discretisations and curricula (Song et al. 2023; Song & Dhariwal 2023), as pure functions
  of TRACED scalars, so that a change of N or mu during training never changes a shape nor recompiles:
  `karras_sigma(i, N, ...)` is node i of the increasing N-point rho grid, `karras_index` its continuous
  inverse; `constant_n`, `song_ct_n` / `song_ct_mu` (CM paper, Appendix C) and `ict_n` (iCT) map the training
  step k to N(k) and mu(k).

This module is a leaf: `sde.py` imports the EDM table from here, so `time_grid` takes its SDE argument by
duck typing (anything with `t_min`, `t_max`, `logsnr` and `t_from_logsnr`, i.e. an `AbstractSDE`).
"""

from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .typing import IntScalar, Scalar

GridSpacing = Literal["uniform", "karras"]


def _fractions(n_steps: int) -> np.ndarray:
    """i / n_steps, i = 0..n_steps, as correctly rounded float32 (host-side)."""
    return np.arange(n_steps + 1, dtype=np.float32) / np.float32(n_steps)


def uniform_grid(t_start: Scalar, t_end: Scalar, n_steps: int) -> Float[Array, " n_times"]:
    """n_steps + 1 evenly spaced times from t_start to t_end (either direction), both ends exact.

    Node i is t_start + (t_end - t_start) * (i / n_steps) with i / n_steps a correctly rounded float32
    division (done by numpy: XLA rewrites division by a constant as a multiplication, which is not), so on
    [0, 1] the nodes are bit-identical to EDM's `t_int / T`.
    """
    frac = jnp.asarray(_fractions(n_steps))
    grid = t_start + (t_end - t_start) * frac
    return grid.at[-1].set(t_end)


def karras_sigma_grid(sigma_min: Scalar, sigma_max: Scalar, n_steps: int, rho: float = 7.0) -> Float[Array, " n_times"]:
    """Karras et al. (2022) eq. 5: n_steps + 1 noise levels, decreasing from sigma_max to sigma_min,
    evenly spaced in sigma^(1/rho)."""
    frac = jnp.asarray(_fractions(n_steps))
    lo = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
    hi = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    return sigmas.at[0].set(sigma_max).at[-1].set(sigma_min)


def time_grid(
    sde: eqx.Module, n_steps: int, spacing: GridSpacing = "uniform", rho: float = 7.0
) -> Float[Array, " n_times"]:
    """A decreasing grid of n_steps + 1 times of `sde` (an `AbstractSDE`) from t_max to t_min.

    `spacing="uniform"`: uniform in the SDE's time. `spacing="karras"`: the Karras rho grid in the scaled noise
    level sigma~(t) = sigma(t) / alpha(t) = exp(-logsnr(t) / 2) (the noise level of z / alpha, which is what
    Karras' sigma means for a VP process), mapped back to time with `sde.t_from_logsnr`. For `KarrasSDE`
    (alpha = 1, sigma = t) this is exactly Karras' grid. The end points are exactly t_max and t_min.
    """
    t_min, t_max = sde.t_min, sde.t_max
    if spacing == "uniform":
        return uniform_grid(t_min, t_max, n_steps)[::-1]  # nodes t_min + k/n (t_max - t_min), k = n..0
    if spacing == "karras":
        s_hi = jnp.exp(-0.5 * sde.logsnr(jnp.asarray(t_max, jnp.float32)))
        s_lo = jnp.exp(-0.5 * sde.logsnr(jnp.asarray(t_min, jnp.float32)))
        sigmas = karras_sigma_grid(s_lo, s_hi, n_steps, rho)
        ts = sde.t_from_logsnr(-2.0 * jnp.log(sigmas))
        return ts.at[0].set(t_max).at[-1].set(t_min)
    raise ValueError(f"unknown grid spacing {spacing!r}; expected 'uniform' or 'karras'")


# ---------------------------------------------------------------------------------------------------------
# EDM's discrete polynomial schedule (host-side float64 construction, as in the reference)


def clip_noise_schedule(alphas2: np.ndarray, clip_value: float = 0.001) -> np.ndarray:
    """Clip the step ratios alpha2_i / alpha2_{i-1} (with alpha2_{-1} = 1) to [clip_value, 1] and re-multiply.

    Keeps each single step from destroying more than a factor 1/clip_value of the signal (EDM,
    after Nichol & Dhariwal's beta clipping). For `polynomial_2` only the last ratio (0) is affected.
    """
    padded = np.concatenate([np.ones(1, dtype=np.float64), np.asarray(alphas2, np.float64)])
    ratios = np.clip(padded[1:] / padded[:-1], clip_value, 1.0)
    return np.cumprod(ratios)


def edm_polynomial_alphas2(n_timesteps: int = 1000, power: float = 2.0, precision: float = 1e-5) -> np.ndarray:
    """alpha^2_i, i = 0..T, of EDM's `polynomial_<power>` schedule, float64 (facts section 3.1).

    Base (1 - (i/T)^power)^2 with i/T formed as EDM forms it (linspace(0, T+1, T+1) / (T+1)), step ratios
    clipped at 0.001, then squeezed to [s, 1 - s] by alpha^2 <- (1 - 2 s) alpha^2 + s.
    """
    n = n_timesteps + 1
    frac = np.linspace(0, n, n) / n
    alphas2 = (1.0 - np.power(frac, power)) ** 2
    alphas2 = clip_noise_schedule(alphas2, clip_value=0.001)
    return (1.0 - 2.0 * precision) * alphas2 + precision


def edm_gamma_table(
    n_timesteps: int = 1000, power: float = 2.0, precision: float = 1e-5
) -> Float[np.ndarray, " n_table"]:
    """EDM's gamma = -log SNR lookup table, length T + 1: computed in float64, returned as float32.

    gamma_i = -(log alpha^2_i - log sigma^2_i) with sigma^2_i = 1 - alpha^2_i (increasing in i).
    """
    alphas2 = edm_polynomial_alphas2(n_timesteps, power, precision)
    sigmas2 = 1.0 - alphas2
    gamma = -(np.log(alphas2) - np.log(sigmas2))
    return gamma.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Consistency models: the N-point discretisation of [sigma_min, sigma_max] and the curricula N(k), mu(k)


def karras_sigma(
    index: IntScalar, n_points: IntScalar, sigma_min: Scalar, sigma_max: Scalar, rho: float = 7.0
) -> Float[Array, ""]:
    """Node `index` (0..N-1, increasing) of the N-point rho grid of the consistency-model papers:
    sigma_i = (sigma_min^(1/rho) + i / (N - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho.

    Index and N may be traced integers (nothing here depends on N as a shape). The end nodes are exactly
    sigma_min (i = 0) and sigma_max (i = N - 1)."""
    i = jnp.asarray(index, jnp.float32)
    n = jnp.asarray(n_points, jnp.float32)
    lo = jnp.asarray(sigma_min, jnp.float32)
    hi = jnp.asarray(sigma_max, jnp.float32)
    a, b = lo ** (1.0 / rho), hi ** (1.0 / rho)
    sigma = (a + i / (n - 1.0) * (b - a)) ** rho
    return jnp.where(i <= 0, lo, jnp.where(i >= n - 1.0, hi, sigma))


def karras_index(
    sigma: Scalar, n_points: IntScalar, sigma_min: Scalar, sigma_max: Scalar, rho: float = 7.0
) -> Float[Array, ""]:
    """The continuous grid coordinate u in [0, N - 1] of `sigma` (inverse of `karras_sigma`): sigma lies in
    the interval [sigma_i, sigma_{i+1}] with i = floor(u)."""
    n = jnp.asarray(n_points, jnp.float32)
    a = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
    b = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
    return (jnp.asarray(sigma, jnp.float32) ** (1.0 / rho) - a) / (b - a) * (n - 1.0)


def constant_n(step: IntScalar, n: IntScalar = 18) -> Int[Array, ""]:
    """N(k) = n for every step (consistency distillation: Song et al. use N = 18 on CIFAR-10)."""
    return jnp.zeros_like(jnp.asarray(step, jnp.int32)) + jnp.asarray(n, jnp.int32)


def song_ct_n(step: IntScalar, total_steps: int, s0: int = 2, s1: int = 150) -> Int[Array, ""]:
    """Consistency training's discretisation curriculum (Song et al. 2023, Appendix C):
    N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, growing from N(0) = s0 to N(K) = s1 + 1
    (CIFAR-10: s0 = 2, s1 = 150, K = 800k); constant after K."""
    k = jnp.minimum(jnp.asarray(step, jnp.float32), float(total_steps))
    inner = jnp.sqrt(k / float(total_steps) * ((s1 + 1.0) ** 2 - s0**2) + s0**2)
    return (jnp.ceil(inner - 1.0) + 1.0).astype(jnp.int32)


def song_ct_mu(step: IntScalar, total_steps: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> Float[Array, ""]:
    """The matching target-EMA curriculum: mu(k) = exp(s0 log(mu0) / N(k)) (Song et al. 2023, Appendix C);
    the target averages more slowly as the grid gets finer."""
    n = song_ct_n(step, total_steps, s0, s1).astype(jnp.float32)
    return jnp.exp(s0 * jnp.log(jnp.float32(mu0)) / n)


def ict_n(step: IntScalar, total_steps: int, s0: int = 10, s1: int = 1280) -> Int[Array, ""]:
    """Improved consistency training's exponential curriculum (Song & Dhariwal 2023, eq. 11):
    N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)): N doubles from
    s0 + 1 = 11 to s1 + 1 = 1281 in equal stages. iCT uses no target EMA (mu = 0)."""
    if not 1 <= s0 <= s1:
        raise ValueError(f"ict_n: need 1 <= s0 <= s1, got s0 = {s0}, s1 = {s1}")
    stage_len = max(int(total_steps // (np.log2(s1 // s0) + 1)), 1)
    stage = jnp.asarray(step, jnp.int32) // stage_len
    n = jnp.minimum(s0 * jnp.exp2(jnp.minimum(stage, 30).astype(jnp.float32)), float(s1))
    return n.astype(jnp.int32) + 1
