"""Equivariant latent diffusion (GeoLDM, Xu et al. 2023): the library's SDEs, objectives and samplers run on the
per-atom latents of an `EquivariantAutoencoder` (`nn/autoencoder.py`).

A latent is a `Molecule` with k = `latent_channels` invariant feature channels, so nothing in `sde.py`,
`denoisers.py`, `samplers.py` or `objectives/` changes: a latent denoiser is an ordinary denoiser built with
n_feat = k (`build_latent_denoiser`), trained by any objective wrapped in `LatentObjective` (which encodes the
data molecule first, z = mu + s eps as GeoLDM does), and sampled by any sampler wrapped in `LatentSampler`
(which decodes the final latent into data space, so `samplers.sample_molecules` and the metrics see ordinary
molecules). Progressive distillation of a latent teacher is `LatentObjective(ProgressiveDistillation(...))`:
Lacombe & Vaidya's equivariant latent progressive distillation.

Checkpoints (one `.eqx` file each, see `checkpoint.py`) embed the autoencoder, so a latent model is
self-contained: kind "autoencoder" (an `EquivariantAutoencoder`), "autoencoder_train_state" ((TrainState,)),
"latent_denoiser" ((denoiser, autoencoder)) and "latent_train_state" ((TrainState, autoencoder)). Their
headers carry `config["autoencoder"]` (an `AutoencoderConfig` dict) and, for latent models, `config["spec"]`
(the latent denoiser's `ModelSpec`) and `config["latent"] = True`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import PyTree

from . import checkpoint
from .denoisers import AbstractDenoiser
from .molecule import Molecule
from .nn.autoencoder import POSTERIOR_STD, EquivariantAutoencoder
from .objectives.base import AbstractObjective
from .run.build import build_network, build_sampler, build_sde_from, dataset_info, denoiser_from, optimizer_from
from .run.configs import ModelSpec, OptimConfig, SamplerConfig, from_dict
from .samplers import NFE, SamplerFn
from .training.state import TrainState, init_state
from .typing import IntScalar, Key, NodeMask, Real

LATENT_KINDS = ("latent_denoiser", "latent_train_state")


@dataclass(frozen=True)
class AutoencoderConfig:
    """GeoLDM's autoencoder (QM9 paper values: k = 1, hidden 256, 1 encoder layer, 9 decoder layers)."""

    latent_channels: int = 1
    """k: invariant latent channels per atom (the latent is a Molecule with k feature channels)"""
    hidden: int = 64
    encoder_layers: int = 1
    decoder_layers: int = 4
    width: int = 16
    """invariant input/output channels of both EGNNs (data features / latents are zero-padded to it)"""
    posterior_std: float = POSTERIOR_STD
    dataset: str = "qm9"


def build_autoencoder(cfg: AutoencoderConfig, *, key: Key) -> EquivariantAutoencoder:
    return EquivariantAutoencoder.build(
        dataset_info(cfg.dataset),
        latent_channels=cfg.latent_channels,
        hidden=cfg.hidden,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        width=cfg.width,
        posterior_std=cfg.posterior_std,
        key=key,
    )


def build_latent_denoiser(spec: ModelSpec, latent_channels: int, *, key: Key) -> AbstractDenoiser:
    """A denoiser of latent molecules: the spec's network with n_feat = k, its SDE and parametrisation."""
    net = build_network(spec.model, latent_channels, key=key)
    return denoiser_from(spec.denoiser, net, build_sde_from(spec.sde))


# --- objective and sampler wrappers -------------------------------------------------------------------------


class LatentObjective(AbstractObjective):
    """Any objective, on latents: the data molecule is encoded, z = mu + s eps (the autoencoder is fixed),
    and `inner.loss_one` runs on (z, mask); anything but a `Molecule` (a latent chain state, e.g. progressive
    distillation's `LevelledState`) goes to `inner` as it is. The autoencoder is a constant of the objective."""

    inner: AbstractObjective
    autoencoder: EquivariantAutoencoder

    def loss_one(
        self,
        model: AbstractDenoiser,
        mol: Molecule | PyTree,
        mask: NodeMask,
        *,
        key: Key,
        step: IntScalar,
        target: AbstractDenoiser | None = None,
    ) -> tuple[Real, dict]:
        k_enc, k_inner = jr.split(key)
        if not isinstance(mol, Molecule):  # already in latent space, e.g. a LevelledState of a latent trajectory
            return self.inner.loss_one(model, mol, mask, key=k_inner, step=step, target=target)
        z = jax.lax.stop_gradient(self.autoencoder.sample_latent(mol, mask, key=k_enc))
        return self.inner.loss_one(model, z, mask, key=k_inner, step=step, target=target)


class LatentSampler(eqx.Module):
    """`sampler_fn(mask, *, key) -> (Molecule, nfe)` that samples a latent with `inner` and decodes it."""

    inner: SamplerFn
    autoencoder: EquivariantAutoencoder

    def __call__(self, mask: NodeMask, *, key: Key) -> tuple[Molecule, NFE]:
        z, nfe = self.inner(mask, key=key)
        return self.autoencoder.decode(z, mask), nfe


def build_latent_sampler(
    cfg: SamplerConfig, denoiser: AbstractDenoiser, autoencoder: EquivariantAutoencoder
) -> LatentSampler:
    """The sampler `cfg` on the latent `denoiser`, its final latent decoded by `autoencoder`."""
    return LatentSampler(build_sampler(cfg, denoiser, autoencoder.latent_channels), autoencoder)


# --- checkpoints --------------------------------------------------------------------------------------------


def is_latent(header: dict) -> bool:
    """Whether a checkpoint header is a latent model's (kind latent_denoiser or latent_train_state)."""
    return header.get("kind") in LATENT_KINDS


def autoencoder_config_of(header: dict, path: Path | str) -> AutoencoderConfig:
    cfg = header["config"].get("autoencoder")
    if not isinstance(cfg, dict):
        raise checkpoint.CheckpointError(f"{path}: the header's config has no 'autoencoder' dict")
    return from_dict(AutoencoderConfig, cfg)


def autoencoder_state_skeleton(cfg: AutoencoderConfig, optim: OptimConfig) -> tuple[TrainState]:
    return eqx.filter_eval_shape(
        lambda: (init_state(build_autoencoder(cfg, key=jr.PRNGKey(0)), optimizer_from(optim)),)
    )


def load_autoencoder(path: Path, *, which: Literal["ema", "model"] = "ema") -> tuple[EquivariantAutoencoder, dict]:
    """An autoencoder from an "autoencoder" file, an "autoencoder_train_state" file (its EMA model by default)
    or any latent model file (its embedded autoencoder). Returns (autoencoder, header)."""
    header = checkpoint.read_header(path)
    cfg = autoencoder_config_of(header, path)
    kind = header["kind"]
    ae_like = eqx.filter_eval_shape(lambda: build_autoencoder(cfg, key=jr.PRNGKey(0)))
    if kind == "autoencoder":
        return checkpoint.load(path, ae_like), header
    if kind == "autoencoder_train_state":
        optim = from_dict(OptimConfig, header["config"]["optim"])
        (state,) = checkpoint.load(path, autoencoder_state_skeleton(cfg, optim))
        return (state.ema_model if which == "ema" else state.model), header
    if is_latent(header):
        _, ae, _, _ = load_latent(path, which=which)
        return ae, header
    raise checkpoint.CheckpointError(
        f"{path}: kind {kind!r} holds no autoencoder (expected autoencoder, autoencoder_train_state or a latent model)"
    )


def latent_state_skeleton(
    spec: ModelSpec, ae_cfg: AutoencoderConfig, config: dict
) -> tuple[TrainState, EquivariantAutoencoder]:
    """Shape-only (TrainState, autoencoder) of a "latent_train_state" file, from its header's config."""
    optim = from_dict(OptimConfig, config["optim"])
    with_target = bool(config.get("with_target", False))

    def make():
        den = build_latent_denoiser(spec, ae_cfg.latent_channels, key=jr.PRNGKey(0))
        state = init_state(den, optimizer_from(optim), with_target=with_target)
        return state, build_autoencoder(ae_cfg, key=jr.PRNGKey(0))

    return eqx.filter_eval_shape(make)


def latent_denoiser_skeleton(
    spec: ModelSpec, ae_cfg: AutoencoderConfig
) -> tuple[AbstractDenoiser, EquivariantAutoencoder]:
    return eqx.filter_eval_shape(
        lambda: (
            build_latent_denoiser(spec, ae_cfg.latent_channels, key=jr.PRNGKey(0)),
            build_autoencoder(ae_cfg, key=jr.PRNGKey(0)),
        )
    )


def load_latent(
    path: Path, *, which: Literal["ema", "model"] = "ema"
) -> tuple[AbstractDenoiser, EquivariantAutoencoder, ModelSpec, dict]:
    """A latent model: returns (latent denoiser, autoencoder, spec, header). For "latent_train_state" files
    the EMA denoiser by default."""
    header = checkpoint.read_header(path)
    if not is_latent(header):
        raise checkpoint.CheckpointError(f"{path}: kind {header['kind']!r} is not a latent model {LATENT_KINDS}")
    spec = from_dict(ModelSpec, header["config"]["spec"])
    ae_cfg = autoencoder_config_of(header, path)
    if header["kind"] == "latent_denoiser":
        den, ae = checkpoint.load(path, latent_denoiser_skeleton(spec, ae_cfg))
    else:
        state, ae = checkpoint.load(path, latent_state_skeleton(spec, ae_cfg, header["config"]))
        den = state.ema_model if which == "ema" else state.model
    return den, ae, spec, header


def load_latent_sampler(
    path: Path, cfg: SamplerConfig, *, which: Literal["ema", "model"] = "ema"
) -> tuple[LatentSampler, ModelSpec, dict]:
    """(sampler_fn that returns decoded molecules, spec, header) for a latent model file."""
    den, ae, spec, header = load_latent(path, which=which)
    return build_latent_sampler(cfg, den, ae), spec, header
