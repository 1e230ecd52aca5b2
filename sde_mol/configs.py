"""Shared frozen config dataclasses and the build_* factories that turn them into objects.

Strings live only here, at the edge: a config names an SDE, a parametrisation, a solver; the factories turn
those names into objects once. Configs round-trip through plain JSON dicts (`to_dict` / `from_dict`), which is
what a checkpoint header stores, so any checkpoint can rebuild its own model.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from . import checkpoint
from .cli import UsageError
from .data.qm9 import DatasetInfo, qm9_info
from .denoisers import (
    AbstractDenoiser,
    ConsistencyFunction,
    EpsConsistencyFunction,
    EpsDenoiser,
    KarrasDenoiser,
    TruncatedConsistencyFunction,
)
from .nn.egnn import EGNN
from .sde import AbstractSDE, DiscreteVPSDE, build_sde
from .train import build_optimizer, init_state


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


def to_dict(cfg) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (Paths become strings)."""

    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls, d: dict[str, Any]):
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


def dataset_info(name: str = "qm9") -> DatasetInfo:
    if name != "qm9":
        raise ValueError(f"unknown dataset {name!r}; expected 'qm9'")
    return qm9_info()


def build_sde_from(cfg: SDEConfig) -> AbstractSDE:
    if cfg.name == "vp_discrete":
        return build_sde(cfg.name, n_timesteps=cfg.timesteps, power=cfg.power, precision=cfg.precision)
    if cfg.name == "vp_polynomial":
        return build_sde(cfg.name, power=cfg.power, precision=cfg.precision)
    if cfg.name in ("ve", "karras"):
        return build_sde(cfg.name, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
    return build_sde(cfg.name)


def continuous_sde_config(cfg: SDEConfig) -> SDEConfig:
    """The continuous-time twin of an SDE config: EDM's discrete table `vp_discrete` becomes `vp_polynomial`
    (the same polynomial schedule, power and precision, in continuous time; see `sde.DiscreteVPSDE`); every
    other SDE is already continuous and returned unchanged."""
    if cfg.name == "vp_discrete":
        return dataclasses.replace(cfg, name="vp_polynomial")
    return cfg


def continuous_teacher(teacher: AbstractDenoiser, spec: ModelSpec) -> tuple[AbstractDenoiser, ModelSpec]:
    """The teacher on the continuous twin of its SDE (`continuous_sde_config`), and its spec with that SDE: the
    network is unchanged (it receives the raw time t, on which it was trained at the table knots i / T). For
    consistency models (sde_mol/consistency_recipe.py explains why they need it) and for grids the discrete
    table cannot resolve (progressive distillation from 1024 steps). A `DiscreteVPSDE` teacher whose table is
    not the twin's schedule (another table) is an error."""
    twin_cfg = continuous_sde_config(spec.sde)
    if twin_cfg == spec.sde:
        return teacher, spec
    twin = build_sde_from(twin_cfg)
    if isinstance(teacher.sde, DiscreteVPSDE):
        n = teacher.sde.n_timesteps
        knots = np.arange(n, dtype=np.float32) / np.float32(n)  # the last knot carries EDM's clip; skip it
        table = np.asarray(teacher.sde.gamma_table[:n], np.float64)
        gap = float(np.max(np.abs(np.asarray(jax.vmap(twin.gamma)(jnp.asarray(knots)), np.float64) - table)))
        if gap > 1e-3 * max(1.0, float(np.max(np.abs(table)))):
            raise ValueError(
                f"the teacher's discrete schedule differs from its continuous twin {twin_cfg.name} by {gap:.3g} in "
                "gamma at the table knots (see sde_mol/consistency_recipe.py)"
            )
    return eqx.tree_at(lambda d: d.sde, teacher, twin), dataclasses.replace(spec, sde=twin_cfg)


def build_network(cfg: ModelConfig, n_feat: int, *, key) -> EGNN:
    return EGNN(
        n_feat,
        cfg.hidden,
        cfg.n_layers,
        key=key,
        inv_sublayers=cfg.inv_sublayers,
        attention=cfg.attention,
        tanh=cfg.tanh,
        coords_range=cfg.coords_range,
        norm_constant=cfg.norm_constant,
        normalization_factor=cfg.normalization_factor,
        aggregation=cfg.aggregation,
        condition_time=cfg.condition_time,
    )


def denoiser_from(cfg: DenoiserConfig, net, sde: AbstractSDE):
    """The one parametrisation name -> denoiser map (a network and an SDE in, an `AbstractDenoiser` out)."""
    if cfg.parametrisation == "eps":
        return EpsDenoiser(net, sde)
    if cfg.parametrisation == "karras":
        return KarrasDenoiser(net, sde, sigma_data=cfg.sigma_data)
    if cfg.parametrisation == "consistency":
        return ConsistencyFunction(net, sde, sigma_data=cfg.sigma_data)
    if cfg.parametrisation == "eps_consistency":
        return EpsConsistencyFunction(net, sde)
    raise ValueError(
        f"unknown parametrisation {cfg.parametrisation!r}; expected eps, karras, consistency or eps_consistency"
    )


def build_denoiser(spec: ModelSpec, *, key):
    """A freshly initialised denoiser of `spec`; a truncated consistency spec gets two networks (keys split)."""
    info = dataset_info(spec.dataset)
    sde = build_sde_from(spec.sde)
    cut = spec.denoiser.truncation_sigma
    if cut is None:
        return denoiser_from(spec.denoiser, build_network(spec.model, info.n_feat, key=key), sde)
    if spec.denoiser.parametrisation not in ("consistency", "eps_consistency"):
        raise ValueError(
            f"truncation_sigma={cut}: a truncated model needs a consistency parametrisation, not "
            f"{spec.denoiser.parametrisation!r}"
        )
    part = dataclasses.replace(spec.denoiser, truncation_sigma=None)
    low, high = (denoiser_from(part, build_network(spec.model, info.n_feat, key=k), sde) for k in jr.split(key))
    return TruncatedConsistencyFunction(low, high, cut)


def denoiser_skeleton(spec: ModelSpec):
    """Shape-only denoiser for deserialisation (no weights are initialised)."""
    return eqx.filter_eval_shape(lambda: build_denoiser(spec, key=jr.PRNGKey(0)))


def load_denoiser(path: Path, *, which: Literal["ema", "model"] = "ema"):
    """Load a denoiser from any sde_mol checkpoint: a "denoiser" file, or a "train_state" file (its EMA model by
    default). Returns (denoiser, spec, header)."""
    header = checkpoint.read_header(path)
    spec = from_dict(ModelSpec, header["config"]["spec"])
    kind = header["kind"]
    if kind == "denoiser":
        den = checkpoint.load(path, denoiser_skeleton(spec))
    elif kind == "train_state":
        state_like = train_state_skeleton(spec, header["config"])
        state = checkpoint.load(path, state_like)
        den = state.ema_model if which == "ema" else state.model
    else:
        raise checkpoint.CheckpointError(f"{path}: kind {kind!r} holds no denoiser (expected denoiser or train_state)")
    return den, spec, header


def train_state_skeleton(spec: ModelSpec, config: dict):
    """Shape-only TrainState matching a train_state checkpoint, from its header's config (optimiser from
    config["optim"], a target model if config["with_target"])."""
    optim = from_dict(OptimConfig, config["optim"])
    with_target = bool(config.get("with_target", False))

    def make():
        den = build_denoiser(spec, key=jr.PRNGKey(0))
        return init_state(den, optimizer_from(optim), with_target=with_target)

    return eqx.filter_eval_shape(make)


def optimizer_from(cfg: OptimConfig):
    return build_optimizer(
        cfg.lr,
        weight_decay=cfg.weight_decay,
        amsgrad=cfg.amsgrad,
        clip=cfg.clip,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps,
        lr_end=cfg.lr_end,
    )


@dataclass(frozen=True)
class SamplerConfig:
    """How to draw molecules from a denoiser."""

    sampler: Literal["ancestral", "ddim", "pf_ode", "reverse_sde", "consistency"] = "pf_ode"
    steps: int = 50
    """number of steps (ancestral: EDM uses 1000; DDIM 100; PF-ODE heun 50; reverse SDE 500; consistency
    models 1, 2 or 4 network evaluations); for an adaptive PF-ODE solve, the initial step is
    (t_max - t_min) / steps"""
    solver: Literal["euler", "heun", "midpoint", "tsit5", "dopri5"] = "heun"
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


def build_sampler(cfg: SamplerConfig, denoiser, n_feat: int):
    """A `sampler_fn(mask, *, key) -> (Molecule, nfe)` for `samplers.sample_molecules` (weights stay traced)."""
    from . import samplers

    sde = denoiser.sde
    if cfg.sampler in ("ancestral", "ddim") and isinstance(sde, DiscreteVPSDE) and cfg.steps > sde.n_timesteps:
        raise UsageError(
            f"--sampler.steps {cfg.steps}: {cfg.sampler} on EDM's discrete table needs at most its T = "
            f"{sde.n_timesteps} steps (two steps would share a table entry); use --continuous-time for more"
        )
    if cfg.sampler == "consistency":
        return eqx.Partial(samplers.consistency_sample, denoiser, sde, n_feat=n_feat, ts=consistency_times_of(cfg, sde))
    common = dict(n_feat=n_feat, grid=cfg.grid, rho=cfg.rho)
    if cfg.sampler == "ancestral":
        return eqx.Partial(samplers.ancestral_sample, denoiser, sde, n_steps=cfg.steps, **common)
    if cfg.sampler == "ddim":
        return eqx.Partial(samplers.ddim_sample, denoiser, sde, n_steps=cfg.steps, eta=cfg.eta, **common)
    if cfg.sampler == "reverse_sde":
        return eqx.Partial(samplers.reverse_sde_sample, denoiser, sde, n_steps=cfg.steps, **common)
    return eqx.Partial(
        samplers.pf_ode_sample,
        denoiser,
        sde,
        n_steps=cfg.steps,
        solver=cfg.solver,
        adaptive=cfg.adaptive,
        rtol=cfg.rtol,
        atol=cfg.atol,
        max_steps=cfg.max_steps,
        **common,
    )


def consistency_times_of(cfg: SamplerConfig, sde: AbstractSDE):
    """The intermediate times of a consistency sampler of `cfg.steps` steps: from `cfg.consistency_sigmas`
    (noise levels s = sigma / alpha) when given, else `samplers.consistency_times`."""
    from . import samplers

    if not cfg.consistency_sigmas:
        return samplers.consistency_times(sde, cfg.steps, rho=cfg.rho)
    sigmas = tuple(float(s) for s in cfg.consistency_sigmas)
    if len(sigmas) != cfg.steps - 1:
        raise ValueError(
            f"--sampler.consistency-sigmas {sigmas}: a {cfg.steps}-step consistency sampler re-noises "
            f"{cfg.steps - 1} times (give steps - 1 levels)"
        )
    if any(b >= a for a, b in zip(sigmas[:-1], sigmas[1:], strict=True)) or sigmas[-1] <= 0:
        raise ValueError(f"--sampler.consistency-sigmas {sigmas}: expected positive, strictly decreasing levels")
    return samplers.sigmas_to_times(sde, jnp.asarray(sigmas, jnp.float32))


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


def build_consistency_loss(cfg: ConsistencyLossConfig, estimator, n_points, *, boundary=None, boundary_sigma=None):
    """A `ConsistencyLoss` from its config, the estimator (`TeacherStep` for CD, `UnbiasedEstimator` for CT)
    and the curriculum N(k) (a callable of the step, e.g. `eqx.Partial(schedules.constant_n, n=18)`).
    `boundary`, `boundary_sigma`: truncated training (TCM's stage 2) above s' = boundary_sigma with the frozen
    stage-1 `boundary` as target at and below it; the index is then uniform over the intervals above s', with
    `cfg.boundary_fraction` of the draws on the boundary interval when given."""
    from .objectives import consistency as cm

    distances = {"l2": cm.L2Distance, "l1": cm.L1Distance}
    distance = cm.PseudoHuberDistance(cfg.huber_c) if cfg.distance == "pseudo_huber" else distances[cfg.distance]()
    weighting = cm.InverseStepWeighting() if cfg.weighting == "inverse_step" else cm.UniformWeighting()
    index = cm.LogNormalIndex(cfg.p_mean, cfg.p_std) if cfg.index == "lognormal" else cm.UniformIndex()
    if boundary is not None:
        if cfg.index != "uniform":
            raise ValueError(
                f"truncated training draws the interval uniformly above the truncation level {boundary_sigma}; "
                f"pass --loss.index uniform (got {cfg.index!r})"
            )
        index = cm.TruncatedIndex(boundary_sigma, cfg.boundary_fraction)
    elif cfg.boundary_fraction is not None:
        raise ValueError(
            f"--loss.boundary-fraction {cfg.boundary_fraction} applies to truncated training only: pass --boundary "
            "(a stage-1 student) and --truncation-sigma, or drop it"
        )
    return cm.ConsistencyLoss(estimator, n_points, distance, weighting, index, cfg.rho, boundary, boundary_sigma)
