"""The run layer's frozen config dataclasses: what a recipe's command line sets and a checkpoint header stores.

Configs are plain data (strings name the SDE, the parametrisation, the sampler, the solver); `run.build` turns
them into objects, once. They round-trip through JSON dicts (`to_dict` / `from_dict`), so any checkpoint can
rebuild its own model.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SolverName = Literal["euler", "heun", "midpoint", "tsit5", "dopri5"]
"""The diffrax solvers a config can name (`run.build.solver_from_name` makes them)."""


@dataclass(frozen=True)
class ModelConfig:
    """The EGNN (EDM's `egnn_dynamics`)."""

    hidden: int = 256
    n_layers: int = 9
    inv_sublayers: int = 1
    attention: bool = True
    tanh: bool = True
    coords_range: float = 15.0
    norm_constant: float = 1.0
    normalization_factor: float = 1.0
    aggregation: Literal["sum", "mean"] = "sum"
    condition_time: bool = True


@dataclass(frozen=True)
class SDEConfig:
    """The forward process. `vp_discrete` is EDM's float32 gamma table (T steps, polynomial schedule)."""

    name: Literal["vp_discrete", "vp_polynomial", "vp_cosine", "ve", "karras"] = "vp_discrete"
    timesteps: int = 1000
    power: float = 2.0
    precision: float = 1e-5
    sigma_min: float = 0.002
    sigma_max: float = 80.0


@dataclass(frozen=True)
class DenoiserConfig:
    parametrisation: Literal["eps", "karras", "consistency", "eps_consistency"] = "eps"
    """eps: EDM's EpsDenoiser; karras: KarrasDenoiser; consistency: ConsistencyFunction (Song et al. 2023);
    eps_consistency: EpsConsistencyFunction (a consistency function on an EDM eps network, ECT-style init)"""
    sigma_data: float = 0.5
    """Karras / consistency preconditioning scale (unused by eps and eps_consistency)"""
    truncation_sigma: float | None = None
    """consistency parametrisations only: a truncated consistency model (TCM) of two networks of this spec,
    joined at this noise level s' = sigma / alpha (`denoisers.TruncatedConsistencyFunction`); None: one network"""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-12
    amsgrad: bool = True
    clip: str = "adaptive"
    """"adaptive" (EDM's queue rule), "none", or a number for fixed global-norm clipping"""
    ema_decay: float = 0.9999
    warmup_steps: int = 0
    """linear lr warm-up from 0 over this many steps"""
    decay_steps: int = 0
    """> 0: after the warm-up, a cosine decay of the lr to --optim.lr-end over this many steps; 0: constant"""
    lr_end: float = 0.0
    """the lr at the end of the cosine decay"""


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["qm9"] = "qm9"
    batch_size: int = 64
    n_train: int | None = None
    """use only the first n train molecules (quick experiments); None = all 100,000"""
    buckets: tuple[int, ...] = ()
    """size buckets (capacities) for batching, e.g. 17 20 23 29: one compilation each, ~2.2x less edge work
    on QM9 than padding every batch to 29; empty = pad to the dataset capacity"""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a denoiser: stored in every checkpoint header."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sde: SDEConfig = field(default_factory=SDEConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    dataset: str = "qm9"


@dataclass(frozen=True)
class SamplerConfig:
    """How to draw molecules from a denoiser."""

    sampler: Literal["ancestral", "ddim", "pf_ode", "reverse_sde", "consistency"] = "pf_ode"
    steps: int = 50
    """number of steps (ancestral: EDM uses 1000; DDIM 100; PF-ODE heun 50; reverse SDE 500; consistency
    models 1, 2 or 4 network evaluations); for an adaptive PF-ODE solve, the initial step is
    (t_max - t_min) / steps"""
    solver: SolverName = "heun"
    """PF-ODE solver (diffrax)"""
    grid: Literal["uniform", "karras"] = "uniform"
    rho: float = 7.0
    adaptive: bool = False
    """PF-ODE with a PID step-size controller (rtol/atol) instead of the fixed grid"""
    rtol: float = 1e-4
    atol: float = 1e-4
    max_steps: int = 4096
    """adaptive PF-ODE: the most solver steps before the solve stops with an error"""
    eta: float = 0.0
    """DDIM stochasticity (0 = deterministic)"""
    consistency_sigmas: tuple[float, ...] = ()
    """consistency multistep (Song et al. 2023, Algorithm 1): the steps - 1 decreasing noise levels
    s = sigma / alpha to re-noise to after the first step; empty: `samplers.consistency_times` (iCT's
    midpoint 0.821 for 2 steps, then a rho = --sampler.rho grid from 0.821 down to s(t_min))"""


@dataclass(frozen=True)
class GuideConfig:
    """Autoguidance (`denoisers.GuidedDenoiser`): guide the sampled model with a weaker one of the same data and
    SDE, D = D_guide + weight (D_model - D_guide), at times in [t_low, t_high]."""

    checkpoint: Path | None = None
    """the weaker model (a denoiser or train_state checkpoint, e.g. checkpoints/edm_qm9_small.eqx); None: no
    guidance"""
    weight: float = 1.0
    """guidance weight w (1 = the model alone; > 1 extrapolates away from the guide)"""
    t_low: float = 0.0
    t_high: float | None = None
    """guidance acts at diffusion times t_low <= t <= t_high only (the model alone elsewhere); None: no upper
    bound"""


@dataclass(frozen=True)
class EpsLossConfig:
    """Which noise levels EDM's eps loss trains on (`objectives.denoising.EDMEpsLoss`)."""

    low_noise_fraction: float = 0.0
    """share of the molecules whose step is drawn from t <= --loss.low-noise-t-max instead of all of [0, 1]
    (0: EDM's loss; > 0 reweights it towards the low-noise levels, e.g. for a fine-tune)"""
    low_noise_t_max: float = 0.1
    """the top of the low-noise range"""


@dataclass(frozen=True)
class ConsistencyLossConfig:
    """The consistency loss (`objectives.consistency.ConsistencyLoss`): distance, weighting, interval index."""

    distance: Literal["l2", "l1", "pseudo_huber"] = "l2"
    """squared L2 (Song et al. 2023), L1, or iCT's pseudo-Huber sqrt(d^2 + c^2) - c"""
    huber_c: float | None = None
    """pseudo-Huber c; None: iCT's 0.00054 sqrt(state dimension) of each molecule"""
    weighting: Literal["uniform", "inverse_step"] = "uniform"
    """lambda = 1 (Song et al.) or 1 / (s_{n+1} - s_n) (iCT)"""
    index: Literal["uniform", "lognormal"] = "uniform"
    """interval n ~ U{0..N-2} (Song et al.) or iCT's discretised log-normal of the noise level"""
    p_mean: float = -1.1
    """lognormal index: mean of log s (iCT)"""
    p_std: float = 2.0
    """lognormal index: std of log s (iCT)"""
    rho: float = 7.0
    """the N-point grid is rho-spaced in s = sigma / alpha"""
    boundary_fraction: float | None = None
    """with --boundary: share of draws on the boundary interval at every N (TCM); None: uniform above s'"""


@dataclass(frozen=True)
class EvalConfig:
    """What a diffusion training run measures at each evaluation (`run.recipe.diffusion_evaluator`)."""

    n_valid: int = 1000
    """validation molecules for the NLL (EMA model, one pass of EDM's estimator) and the eps error per level"""
    levels: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6, 0.9)
    """times t at which the EMA model's eps MSE on the validation molecules is reported (val_eps_mse@t, fixed
    noise every evaluation: paired across steps), and their mean val_eps_mse (the run's best.eqx criterion)"""
    n_samples: int = 200
    """molecules sampled for stability/validity at each evaluation (0 to skip)"""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(sampler="ddim", steps=100))
    batch_size: int = 100


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (Paths become strings)."""

    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Rebuild a (nested) dataclass config from a dict; unknown keys are an error, missing keys take defaults."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    for k, v in d.items():
        sub = _nested_type(names[k], cls)
        kwargs[k] = from_dict(sub, v) if sub is not None and isinstance(v, dict) else v
    return cls(**kwargs)


def _nested_type(f, owner):
    hints = {"model": ModelConfig, "sde": SDEConfig, "denoiser": DenoiserConfig}
    return hints.get(f.name) if owner is ModelSpec else None
