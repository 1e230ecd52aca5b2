"""Loading any sde_mol checkpoint as objects: the skeleton comes from the header's config (`run.build`), the
leaves from the file (`checkpoint.load`)."""

from pathlib import Path
from typing import Literal

import equinox as eqx
import jax.random as jr

from .. import checkpoint
from ..cli import UsageError
from ..denoisers import AbstractDenoiser, GuidedDenoiser
from ..latent import is_latent
from ..training.state import TrainState, init_state
from .build import build_denoiser, continuous_sde_config, continuous_teacher, optimizer_from, sde_identity
from .configs import GuideConfig, ModelSpec, OptimConfig, from_dict


def denoiser_skeleton(spec: ModelSpec) -> AbstractDenoiser:
    """Shape-only denoiser for deserialisation (no weights are initialised)."""
    return eqx.filter_eval_shape(lambda: build_denoiser(spec, key=jr.PRNGKey(0)))


def load_denoiser(path: Path, *, which: Literal["ema", "model"] = "ema") -> tuple[AbstractDenoiser, ModelSpec, dict]:
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


def train_state_skeleton(spec: ModelSpec, config: dict) -> TrainState:
    """Shape-only TrainState matching a train_state checkpoint, from its header's config (optimiser from
    config["optim"], a target model if config["with_target"])."""
    optim = from_dict(OptimConfig, config["optim"])
    with_target = bool(config.get("with_target", False))

    def make():
        den = build_denoiser(spec, key=jr.PRNGKey(0))
        return init_state(den, optimizer_from(optim), with_target=with_target)

    return eqx.filter_eval_shape(make)


def with_guide(
    denoiser: AbstractDenoiser,
    spec: ModelSpec,
    guide: GuideConfig,
    *,
    continuous_time: bool = False,
    which: Literal["ema", "model"] = "ema",
) -> AbstractDenoiser:
    """`denoiser` (of `spec`) guided by the weaker model `guide.checkpoint` (`denoisers.GuidedDenoiser`), or
    `denoiser` itself without one. `continuous_time`: the sampled model runs on the continuous twin of its
    schedule, and so does the guide. Refused with the flag named: a weight or interval without a guide, a
    missing file, a latent model, a reversed interval, a guide of another dataset or SDE."""
    upper = float("inf") if guide.t_high is None else guide.t_high
    if guide.checkpoint is None:
        if guide.weight != 1.0 or guide.t_low != 0.0 or guide.t_high is not None:
            raise UsageError("--guide.weight / --guide.t-low / --guide.t-high: give the guide with --guide.checkpoint")
        return denoiser
    path = Path(guide.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"--guide.checkpoint {path} does not exist")
    header = checkpoint.read_header(path)
    if is_latent(header) or header["kind"] not in ("denoiser", "train_state"):
        raise UsageError(
            f"--guide.checkpoint {path}: its kind is {header['kind']!r}; the guide must be a denoiser or train_state"
        )
    if not guide.t_low <= upper:
        raise UsageError(f"--guide.t-low {guide.t_low} / --guide.t-high {guide.t_high}: expected t_low <= t_high")
    gspec = from_dict(ModelSpec, header["config"]["spec"])
    sde = continuous_sde_config(gspec.sde) if continuous_time else gspec.sde
    if gspec.dataset != spec.dataset or sde_identity(sde) != sde_identity(spec.sde):
        raise UsageError(
            f"--guide.checkpoint {path}: its dataset / SDE ({gspec.dataset}, {sde}) differ from the sampled "
            f"model's ({spec.dataset}, {spec.sde}); the guide must share the model's dataset and SDE"
            + ("" if continuous_time else " (--continuous-time compares their continuous twins)")
        )
    model, gspec, _ = load_denoiser(path, which=which)
    if continuous_time:
        model, _ = continuous_teacher(model, gspec)
    return GuidedDenoiser(denoiser, model, guide.weight, guide.t_low, upper)
