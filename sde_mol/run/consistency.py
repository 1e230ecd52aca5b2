"""What the consistency recipes share (recipes/consistency_distill.py and recipes/consistency_train.py) beyond
the recipe skeleton (`run.recipe`): the continuous-time teacher, the student, the training run and its
checkpoints.

Checkpoints. A run writes `last.eqx`, kind "train_state" (model, EMA model, target model or None, optimiser
state, step), which `run.load.load_denoiser` reads like every training state (its EMA model by default), and at
the end of every invocation `student.eqx`, kind "denoiser", the EMA consistency function. Both headers hold the
student's `ModelSpec` (parametrisation "consistency" or "eps_consistency", a continuous-time SDE), so
`load_denoiser` rebuilds a `ConsistencyFunction` / `EpsConsistencyFunction`, and a "consistency" entry: the
method ("cd" / "ct"), the sampler to use (`SamplerConfig("consistency", steps=1)`; 2, 4, ... steps work as well)
and the run's settings. `generate` reads that entry and notes a mismatching `--sampler.sampler`.

Truncated consistency models (TCM; Lee et al. 2025). `--boundary <stage-1 student.eqx>` makes a run TCM's stage
2: the student starts from the stage-1 network, trains only the intervals above `--truncation-sigma` s' (uniform
interval index) and takes its targets at and below s' from the frozen stage-1 model (`ConsistencyLoss.boundary`).
`student.eqx` is then the joined `TruncatedConsistencyFunction` (spec `truncation_sigma` = s': the stage-1
network below s', the stage-2 one above); `last.eqx` holds the stage-2 network alone (resume it; sample
`student.eqx`).

Discrete teachers. EDM checkpoints use `DiscreteVPSDE`, whose marginal is piecewise constant in t (a lookup of
T = 1000 table levels). The consistency grid's times (rho-spaced in sigma / alpha, N(k) of them) fall between
the table's knots, where the lookup snaps them onto the nearest level: grid points closer than half a table
step collapse onto one noise level, while the teacher's PF-ODE step between them (with the interpolated
table's rates) still moves the state, so the student would be asked to be consistent across steps it cannot
see, and every grid noise level is off the marginal it is drawn from. `run.build.continuous_teacher` therefore re-wraps
the teacher's network with the continuous twin of its schedule (`PolynomialVPSDE` of the same power and
precision, which equals EDM's table at every knot up to the table's float32 rounding; checked here), and the
student lives on that SDE too. The network is unchanged: it receives the raw time t, on which it was trained at
the knots i / T.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import checkpoint
from ..data.qm9 import QM9_BUCKETS
from ..denoisers import AbstractDenoiser, EpsDenoiser, KarrasDenoiser, TruncatedConsistencyFunction
from ..training.loop import LoopConfig
from ..training.state import count_params
from .build import build_sde_from, continuous_sde_config, denoiser_from, optimizer_from
from .configs import (
    ConsistencyLossConfig,
    DataConfig,
    DenoiserConfig,
    ModelConfig,
    ModelSpec,
    OptimConfig,
    SamplerConfig,
    SDEConfig,
    to_dict,
)
from .load import load_denoiser
from .recipe import fit, initial_state, score_sampler

CONSISTENCY_PARAMETRISATIONS = ("consistency", "eps_consistency")


@dataclass(frozen=True)
class RunConfig:
    """The settings both consistency recipes share (each recipe's `Config` adds its method's own)."""

    spec: ModelSpec = field(
        default_factory=lambda: ModelSpec(
            ModelConfig(hidden=64, n_layers=4), SDEConfig("vp_polynomial"), DenoiserConfig("consistency", 0.5)
        )
    )
    """a student built from scratch (a consistency parametrisation on a continuous-time SDE)"""
    loss: ConsistencyLossConfig = field(default_factory=ConsistencyLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, ema_decay=0.9999, clip="1.0"))
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=64, buckets=QM9_BUCKETS))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=100_000, log_every=100, ckpt_every=1000))
    eval_samples: int = 0
    """molecules sampled and scored at the end for each of --eval-steps; 0 = skip"""
    eval_steps: tuple[int, ...] = (1, 2)
    out_dir: Path = Path("runs/consistency")
    resume: Path | None = None
    """a last.eqx of this recipe (same settings) to continue from"""
    init_seed: int = 0
    boundary: Path | None = None
    """TCM stage 2 (Lee et al. 2025): a stage-1 student.eqx of this recipe; the student starts from its network,
    trains only above --truncation-sigma (needs --loss.index uniform) and takes its targets at and below it from
    the frozen stage-1 model; student.eqx is then the joined truncated consistency model"""
    truncation_sigma: float | None = None
    """with --boundary: TCM's truncation level s' (in sigma / alpha, e.g. 0.16)"""
    dry_run: bool = False


# --- teacher and student -----------------------------------------------------------------------------------


def check_student_spec(spec: ModelSpec) -> None:
    """A consistency student: a consistency parametrisation on a continuous-time SDE."""
    if spec.denoiser.parametrisation not in CONSISTENCY_PARAMETRISATIONS:
        raise ValueError(
            f"--spec.denoiser.parametrisation {spec.denoiser.parametrisation!r}: a consistency student needs one of "
            f"{CONSISTENCY_PARAMETRISATIONS}"
        )
    if build_sde_from(spec.sde).time_resolution is not None:
        raise ValueError(
            f"--spec.sde.name {spec.sde.name!r} is piecewise constant in time: consistency models need a "
            f"continuous-time SDE (its twin is {continuous_sde_config(spec.sde).name!r})"
        )


def student_from_teacher(teacher: EpsDenoiser | KarrasDenoiser, spec: ModelSpec) -> tuple[AbstractDenoiser, ModelSpec]:
    """ECT-style initialisation (Geng et al. 2024): a consistency function on a copy of a (continuous-SDE)
    teacher's network. eps teachers give `EpsConsistencyFunction`, Karras teachers `ConsistencyFunction` with
    their sigma_data (whose c_skip, c_out approach Karras' away from t_min)."""
    param = {"eps": "eps_consistency", "karras": "consistency"}.get(spec.denoiser.parametrisation)
    if param is None:
        raise ValueError(f"cannot initialise a consistency student from a {spec.denoiser.parametrisation!r} teacher")
    spec = replace(spec, denoiser=replace(spec.denoiser, parametrisation=param))
    return denoiser_from(spec.denoiser, teacher.net, teacher.sde), spec


def load_boundary(path: Path, sigma: float | None) -> tuple[AbstractDenoiser, ModelSpec]:
    """TCM's stage-1 model from `--boundary path` for a stage-2 run truncated at `--truncation-sigma sigma`:
    (the model, its spec). It must be a plain (not yet truncated) consistency function on a continuous SDE, and
    s_min < sigma < s_max of that SDE."""
    if sigma is None:
        raise ValueError(f"--boundary {path}: give the truncation level --truncation-sigma (in sigma / alpha)")
    if not path.is_file():
        raise FileNotFoundError(f"--boundary {path} does not exist (a consistency checkpoint: student.eqx)")
    boundary, spec, _ = load_denoiser(path)
    if spec.denoiser.truncation_sigma is not None:
        raise ValueError(
            f"--boundary {path}: already truncated at {spec.denoiser.truncation_sigma} (a stage-2 model); give its "
            "stage-1 model"
        )
    check_student_spec(spec)
    s_min, s_max = (float(boundary.sde.scaled_sigma(t)) for t in (boundary.sde.t_min, boundary.sde.t_max))
    if not s_min < sigma < s_max:
        raise ValueError(f"--truncation-sigma {sigma}: must lie in ({s_min:.4g}, {s_max:.4g}), the SDE of {path}")
    return boundary, spec


def truncated_spec(spec: ModelSpec, sigma: float) -> ModelSpec:
    return replace(spec, denoiser=replace(spec.denoiser, truncation_sigma=sigma))


# --- the run -------------------------------------------------------------------------------------------------


def train(
    cfg,
    *,
    method: str,
    objective,
    student: AbstractDenoiser,
    spec: ModelSpec,
    batches,
    with_target: bool,
    target_decay,
    resume_keys: tuple[str, ...],
    settings: dict,
    boundary: AbstractDenoiser | None = None,
    truncation_sigma: float | None = None,
) -> dict:
    """Train a consistency student (`run.recipe.fit`) and write its checkpoints (module docstring).

    `cfg` is the recipe's Config (a `RunConfig`, after `run.recipe.start`). `resume_keys`: the Config fields a
    resumed run must share with the checkpoint's. `settings`: what the header's "consistency" entry records
    besides method and sampler. `boundary`, `truncation_sigma`: a TCM stage-2 run (the objective already uses
    them; `cfg.boundary` and `cfg.truncation_sigma` join the resume keys and settings); student.eqx joins the
    boundary and the student."""
    check_student_spec(spec)
    resume_keys = (*resume_keys, "boundary", "truncation_sigma")  # cfg fields of both recipes
    if boundary is not None:
        settings = dict(settings, boundary=str(cfg.boundary), truncation_sigma=truncation_sigma)
    full = json.loads(json.dumps(to_dict(cfg), default=str))
    entry = {"method": method, "sampler": to_dict(SamplerConfig("consistency", steps=1)), **settings}
    header = {"recipe": f"consistency_{method}", "spec": to_dict(spec), "consistency": entry, "full": full}
    optimizer = optimizer_from(cfg.optim)
    if cfg.resume is not None and checkpoint.read_header(cfg.resume)["config"].get("consistency") != entry:
        stored = checkpoint.read_header(cfg.resume)["config"].get("consistency")
        raise ValueError(f"{cfg.resume}: its run {stored} differs from the requested {entry}")
    state = initial_state(student, optimizer, with_target=with_target, resume=cfg.resume, full=full, keys=resume_keys)
    print(f"consistency {method}: student parameters {count_params(state.model):,}, {cfg.train.steps} steps")
    state = fit(
        state,
        objective,
        optimizer,
        batches,
        loop=cfg.train,
        ema_decay=cfg.optim.ema_decay,
        out_dir=cfg.out_dir,
        header=dict(header, optim=to_dict(cfg.optim), with_target=with_target),
        batch_size=cfg.data.batch_size,
        target_decay=target_decay,
    )
    path = cfg.out_dir / "student.eqx"
    final, final_header = state.ema_model, header
    if boundary is not None:
        final = TruncatedConsistencyFunction(boundary, state.ema_model, truncation_sigma)
        final_header = dict(header, spec=to_dict(truncated_spec(spec, truncation_sigma)))
    checkpoint.save(path, final, kind="denoiser", config=final_header, step=int(state.step))
    result = {"student": str(path), "step": int(state.step)}
    for n in cfg.eval_steps if cfg.eval_samples else ():
        result[f"{n}_step"] = score_sampler(
            SamplerConfig("consistency", steps=n), final, spec, cfg.eval_samples, seed=cfg.train.seed + 2
        )
    scores = "".join(f"; {k}: {v}" for k, v in result.items() if k.endswith("_step"))
    print(f"wrote {path} (step {int(state.step)}){scores}")
    (cfg.out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result
