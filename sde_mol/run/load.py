"""Loading any sde_mol checkpoint as objects: the skeleton comes from the header's config (`run.build`), the
leaves from the file (`checkpoint.load`)."""

from pathlib import Path
from typing import Literal

import equinox as eqx
import jax.random as jr

from .. import checkpoint
from ..denoisers import AbstractDenoiser
from ..training.state import TrainState, init_state
from .build import build_denoiser, optimizer_from
from .configs import ModelSpec, OptimConfig, from_dict


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
