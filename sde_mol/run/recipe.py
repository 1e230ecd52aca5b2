"""What the consistency recipes share (recipes/consistency_distill.py and recipes/consistency_train.py): the QM9
data source (the fixed molecules of oracle:<n> / fixed:<n> come from `data.fixed`), the continuous-time teacher,
the student, the training run and its checkpoints.

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
from dataclasses import replace
from pathlib import Path

import equinox as eqx
import jax.random as jr

from .. import checkpoint, metrics
from ..data.loader import BatchIterator
from ..data.qm9 import load_qm9
from ..denoisers import AbstractDenoiser, TruncatedConsistencyFunction
from ..samplers import sample_molecules
from ..training.loop import run_loop
from ..training.prefetch import host_batches, to_device as batch_to_device
from ..training.state import compute_dtype_from, count_params, init_state, make_step
from .build import build_sampler, build_sde_from, continuous_sde_config, dataset_info, denoiser_from, optimizer_from
from .configs import DataConfig, ModelSpec, SamplerConfig, to_dict
from .load import load_denoiser

CONSISTENCY_PARAMETRISATIONS = ("consistency", "eps_consistency")


def parse_count(value: str, prefix: str, flag: str) -> int | None:
    """n of "<prefix>:<n>" (a positive integer); None when `value` does not start with "<prefix>:"."""
    if not value.startswith(prefix + ":"):
        return None
    n = value.removeprefix(prefix + ":")
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"{flag} {value!r}: expected {prefix}:<n> with a positive integer n")
    return int(n)


# --- data --------------------------------------------------------------------------------------------------


def qm9_batches(data: DataConfig, *, seed: int):
    """Host batches of the QM9 train split (its first `data.n_train` molecules when set), from a global step on."""
    train = load_qm9("train")
    if data.n_train is not None:
        train = train.subset(slice(0, data.n_train))
    iterator = BatchIterator(train, dataset_info(data.dataset), data.batch_size, seed=seed, buckets=data.buckets)
    return lambda start: host_batches(iterator, start)


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


def student_from_teacher(teacher: AbstractDenoiser, spec: ModelSpec) -> tuple[AbstractDenoiser, ModelSpec]:
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
    """Train a consistency student with `train.run_loop` and write its checkpoints (module docstring).

    `cfg` is the recipe's Config: it must have `optim`, `train` (a LoopConfig), `data` (batch_size), `out_dir`,
    `resume`, `eval_samples` and `eval_steps`. `resume_keys`: the Config fields a resumed run must share with
    the checkpoint's. `settings`: what the header's "consistency" entry records besides method and sampler.
    `boundary`, `truncation_sigma`: a TCM stage-2 run (the objective already uses them; `cfg.boundary` and
    `cfg.truncation_sigma` join the resume keys and settings); student.eqx joins the boundary and the student."""
    check_student_spec(spec)
    resume_keys = (*resume_keys, "boundary", "truncation_sigma")  # cfg fields of both recipes
    if boundary is not None:
        settings = dict(settings, boundary=str(cfg.boundary), truncation_sigma=truncation_sigma)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    full = json.loads(json.dumps(to_dict(cfg), default=str))
    (cfg.out_dir / "config.json").write_text(json.dumps(full, indent=2))
    entry = {"method": method, "sampler": to_dict(SamplerConfig("consistency", steps=1)), **settings}
    header = {"recipe": f"consistency_{method}", "spec": to_dict(spec), "consistency": entry, "full": full}
    state_header = dict(header, optim=to_dict(cfg.optim), with_target=with_target)
    optimizer = optimizer_from(cfg.optim)
    if cfg.resume is not None:
        stored = checkpoint.read_header(cfg.resume)["config"]
        for key in resume_keys:
            before = stored.get("full", {}).get(key)
            if before != full[key]:
                raise ValueError(f"{cfg.resume}: its {key} {before!r} differs from the requested {full[key]!r}")
        if stored.get("consistency") != entry:
            raise ValueError(f"{cfg.resume}: its run {stored.get('consistency')} differs from the requested {entry}")
        like = eqx.filter_eval_shape(lambda: init_state(student, optimizer, with_target=with_target))
        state = checkpoint.load(cfg.resume, like, kind="train_state")
        print(f"resumed from {cfg.resume} at step {int(state.step)}")
    else:
        state = init_state(student, optimizer, with_target=with_target)
    print(f"consistency {method}: student parameters {count_params(state.model):,}, {cfg.train.steps} steps")
    step_fn = make_step(
        objective,
        optimizer,
        ema_decay=cfg.optim.ema_decay,
        target_decay=target_decay,
        donate=True,
        compute_dtype=compute_dtype_from(cfg.train.precision),
    )

    def save_state(path, st):
        checkpoint.save(path, st, kind="train_state", config=state_header, step=int(st.step))

    state = run_loop(
        state,
        step_fn,
        batches,
        cfg=cfg.train,
        out_dir=cfg.out_dir,
        save=save_state,
        batch_size=cfg.data.batch_size,
        to_device=batch_to_device,
    )
    path = cfg.out_dir / "student.eqx"
    final, final_header = state.ema_model, header
    if boundary is not None:
        final = TruncatedConsistencyFunction(boundary, state.ema_model, truncation_sigma)
        final_header = dict(header, spec=to_dict(truncated_spec(spec, truncation_sigma)))
    checkpoint.save(path, final, kind="denoiser", config=final_header, step=int(state.step))
    result = {"student": str(path), "step": int(state.step)}
    for n in cfg.eval_steps if cfg.eval_samples else ():
        result[f"{n}_step"] = evaluate(final, spec, n, cfg.eval_samples, seed=cfg.train.seed + 2)
    scores = "".join(f"; {k}: {v}" for k, v in result.items() if k.endswith("_step"))
    print(f"wrote {path} (step {int(state.step)}){scores}")
    (cfg.out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate(student: AbstractDenoiser, spec: ModelSpec, steps: int, n: int, *, seed: int) -> dict:
    """EDM's metrics of n molecules from the `steps`-step consistency sampler."""
    info = dataset_info(spec.dataset)
    fn = build_sampler(SamplerConfig("consistency", steps=steps), student, info.n_feat)
    res = sample_molecules(fn, n, info, key=jr.PRNGKey(seed), batch_size=n)
    m = metrics.evaluate_samples(res, None, atom_decoder=info.atom_decoder)
    return {k: v for k, v in m.items() if v is not None}
