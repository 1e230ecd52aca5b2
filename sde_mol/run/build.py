"""The only string -> object maps of sde_mol: a config in, an SDE, network, denoiser, optimiser, solver or
sampler out. Recipes call these once, at the edge; nothing below the run layer branches on a name.
"""

import dataclasses
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import optax

from .. import samplers
from ..cli import UsageError
from ..data.qm9 import DatasetInfo, qm9_info
from ..denoisers import (
    AbstractDenoiser,
    ConsistencyFunction,
    EpsConsistencyFunction,
    EpsDenoiser,
    KarrasDenoiser,
    TruncatedConsistencyFunction,
)
from ..nn.egnn import EGNN
from ..objectives import consistency as cm
from ..sde import VESDE, AbstractSDE, CosineVPSDE, DiscreteVPSDE, KarrasSDE, PolynomialVPSDE
from ..training.optim import build_optimizer
from ..typing import Key
from .configs import (
    ConsistencyLossConfig,
    DenoiserConfig,
    ModelConfig,
    ModelSpec,
    OptimConfig,
    SamplerConfig,
    SDEConfig,
    SolverName,
)


def solver_from_name(name: SolverName) -> dfx.AbstractSolver:
    """The one name -> diffrax solver map."""
    solvers = {"euler": dfx.Euler, "heun": dfx.Heun, "midpoint": dfx.Midpoint, "tsit5": dfx.Tsit5, "dopri5": dfx.Dopri5}
    if name not in solvers:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(solvers)}")
    return solvers[name]()


def dataset_info(name: str = "qm9") -> DatasetInfo:
    if name != "qm9":
        raise ValueError(f"unknown dataset {name!r}; expected 'qm9'")
    return qm9_info()


def build_sde_from(cfg: SDEConfig) -> AbstractSDE:
    """The one SDE name -> `AbstractSDE` map."""
    if cfg.name == "vp_discrete":
        return DiscreteVPSDE.edm_polynomial(cfg.timesteps, cfg.power, cfg.precision)
    if cfg.name == "vp_polynomial":
        return PolynomialVPSDE(cfg.power, cfg.precision)
    if cfg.name == "vp_cosine":
        return CosineVPSDE()
    if cfg.name == "ve":
        return VESDE(cfg.sigma_min, cfg.sigma_max)
    if cfg.name == "karras":
        return KarrasSDE(cfg.sigma_min, cfg.sigma_max)
    raise ValueError(f"unknown SDE {cfg.name!r}; expected one of {SDEConfig.__annotations__['name'].__args__}")


def sde_identity(cfg: SDEConfig) -> tuple:
    """The fields of an SDE config that `build_sde_from` reads for its SDE: two configs with the same identity
    build the same process (e.g. a continuous twin's leftover `timesteps` does not count)."""
    fields = {"vp_discrete": ("timesteps", "power", "precision"), "vp_polynomial": ("power", "precision")}
    fields |= {"vp_cosine": (), "ve": ("sigma_min", "sigma_max"), "karras": ("sigma_min", "sigma_max")}
    return (cfg.name, *(getattr(cfg, f) for f in fields[cfg.name]))


def continuous_sde_config(cfg: SDEConfig) -> SDEConfig:
    """The continuous-time twin of an SDE config: EDM's discrete table `vp_discrete` becomes `vp_polynomial`
    (the same polynomial schedule, power and precision, in continuous time; see `sde.DiscreteVPSDE`); every
    other SDE is already continuous and returned unchanged."""
    if cfg.name == "vp_discrete":
        return dataclasses.replace(cfg, name="vp_polynomial")
    return cfg


def continuous_teacher(teacher: AbstractDenoiser, spec: ModelSpec) -> tuple[AbstractDenoiser, ModelSpec]:
    """The teacher on the continuous twin of its SDE (`AbstractSDE.continuous_twin`), and its spec with that
    SDE's config: the network is unchanged (it receives the raw time t, on which it was trained at the table
    knots i / T). For consistency models and for grids the discrete table cannot resolve (progressive
    distillation from 1024 steps)."""
    twin_cfg = continuous_sde_config(spec.sde)
    if twin_cfg == spec.sde:
        return teacher, spec
    return eqx.tree_at(lambda d: d.sde, teacher, teacher.sde.continuous_twin()), dataclasses.replace(spec, sde=twin_cfg)


def build_network(cfg: ModelConfig, n_feat: int, *, key: Key) -> EGNN:
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


def denoiser_from(cfg: DenoiserConfig, net: eqx.Module, sde: AbstractSDE) -> AbstractDenoiser:
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


def build_denoiser(spec: ModelSpec, *, key: Key) -> AbstractDenoiser:
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


def optimizer_from(cfg: OptimConfig) -> optax.GradientTransformation:
    return build_optimizer(
        cfg.lr,
        weight_decay=cfg.weight_decay,
        amsgrad=cfg.amsgrad,
        clip=cfg.clip,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps,
        lr_end=cfg.lr_end,
    )


def sampler_from(cfg: SamplerConfig, sde: AbstractSDE) -> samplers.AbstractSampler:
    """The one sampler name -> `AbstractSampler` map (the consistency sampler's times are those of `sde`)."""
    resolution = sde.time_resolution
    if cfg.sampler in ("ancestral", "ddim") and resolution is not None and cfg.steps > resolution:
        raise UsageError(
            f"--sampler.steps {cfg.steps}: {cfg.sampler} on EDM's discrete table needs at most its T = "
            f"{resolution} steps (two steps would share a table entry); use --continuous-time for more"
        )
    grid = dict(grid=cfg.grid, rho=cfg.rho)
    if cfg.sampler == "consistency":
        return samplers.Consistency(consistency_times_of(cfg, sde))
    if cfg.sampler == "ancestral":
        return samplers.Ancestral(cfg.steps, **grid)
    if cfg.sampler == "ddim":
        return samplers.DDIM(cfg.steps, cfg.eta, **grid)
    if cfg.sampler == "reverse_sde":
        return samplers.ReverseSDE(cfg.steps, **grid)
    return samplers.PFODE(
        solver_from_name(cfg.solver),
        cfg.steps,
        adaptive=cfg.adaptive,
        rtol=cfg.rtol,
        atol=cfg.atol,
        max_steps=cfg.max_steps,
        **grid,
    )


def build_sampler(cfg: SamplerConfig, denoiser: AbstractDenoiser, n_feat: int) -> samplers.SamplerFn:
    """`sampler_fn(mask, *, key) -> (Molecule, nfe)` for `samplers.sample_molecules` (weights stay traced)."""
    return eqx.Partial(sampler_from(cfg, denoiser.sde), denoiser, n_feat=n_feat)


def consistency_times_of(cfg: SamplerConfig, sde: AbstractSDE) -> samplers.Times:
    """The intermediate times of a consistency sampler of `cfg.steps` steps: from `cfg.consistency_sigmas`
    (noise levels s = sigma / alpha) when given, else `samplers.consistency_times`."""
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


def build_consistency_loss(
    cfg: ConsistencyLossConfig,
    estimator: cm.AbstractEstimator,
    n_points: Callable,
    *,
    boundary: AbstractDenoiser | None = None,
    boundary_sigma: float | None = None,
) -> cm.ConsistencyLoss:
    """A `ConsistencyLoss` from its config, the estimator (`TeacherStep` for CD, `UnbiasedEstimator` for CT)
    and the curriculum N(k) (a callable of the step, e.g. `eqx.Partial(schedules.constant_n, n=18)`).
    `boundary`, `boundary_sigma`: truncated training (TCM's stage 2) above s' = boundary_sigma with the frozen
    stage-1 `boundary` as target at and below it; the index is then uniform over the intervals above s', with
    `cfg.boundary_fraction` of the draws on the boundary interval when given."""
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
