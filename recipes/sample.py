"""Sample molecules with any sampler (EDM ancestral, DDIM, PF-ODE, reverse SDE), write SDF/XYZ + metrics.json.

Usage:
    python recipes/sample.py --sampler.sampler ancestral --sampler.steps 1000 --n-samples 1000
    python recipes/sample.py --sampler.sampler ddim --sampler.steps 100 --out-dir samples/ddim100
    python recipes/sample.py --sampler.sampler ddim --sampler.steps 100 --sampler.eta 1.0
    python recipes/sample.py --sampler.sampler reverse_sde --sampler.steps 500
    python recipes/sample.py --checkpoint runs/edm_qm9_small/best.eqx --dry-run
    python recipes/sample.py --checkpoint runs/pd_edm/student_4steps.eqx --sampler.sampler ddim --sampler.steps 4
    python recipes/sample.py --checkpoint runs/ldm_qm9/last.eqx --sampler.sampler ddim --sampler.steps 100
    python recipes/sample.py --guide.checkpoint checkpoints/edm_qm9_small.eqx --guide.weight 3 --guide.t-high 0.6

Autoguidance (--guide.*; Karras et al. 2024): the model is extrapolated away from a weaker model of the same data
and SDE, D = D_guide + w (D_model - D_guide), at diffusion times in [t_low, t_high]; NFE counts the sampled
model's evaluations, and each one inside the interval also runs the guide (molecules/s includes its cost).

A progressive-distillation student samples with DDIM at its own step count (its header records it; another
choice runs, with a note). Latent models (recipes/train_latent.py) sample latents and decode them.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import tyro

from sde_mol import cli
from sde_mol.run.configs import GuideConfig
from sde_mol.run.sample import GenerateConfig, generate

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS / "edm_qm9_finetuned.eqx"
RECOMMENDED_GUIDE = GuideConfig(CHECKPOINTS / "edm_qm9_small.eqx", weight=3.0, t_high=0.6)
"""The default model's recommended autoguidance (checkpoints/edm_qm9_finetuned.md): the small CPU model as guide,
weight 3, at t <= 0.6. It belongs to the default model and is used only with it."""
FEWEST_GUIDED_STEPS = 64
"""Below this many sampler steps the recommended guidance was measured to lower quality (a note says so)."""


@dataclass(frozen=True)
class Config(GenerateConfig):
    checkpoint: Path = DEFAULT_CHECKPOINT
    """an sde_mol checkpoint (.eqx): a denoiser, or a training state (its EMA model); default: the shipped
    model, checkpoints/edm_qm9_finetuned.eqx (see its model card)"""
    guide: GuideConfig = field(default_factory=lambda: RECOMMENDED_GUIDE)
    """autoguidance; default: the default model's recommended guide (checkpoints/edm_qm9_small.eqx, weight 3,
    t <= 0.6), used with the default --checkpoint only; --guide.checkpoint None samples it unguided"""


def main(cfg: Config) -> dict:
    if cfg.guide == replace(RECOMMENDED_GUIDE, checkpoint=None):  # --guide.checkpoint None alone: unguided
        cfg = replace(cfg, guide=GuideConfig())
    if cfg.guide == RECOMMENDED_GUIDE and Path(cfg.checkpoint).resolve() != DEFAULT_CHECKPOINT:
        print(f"note: the recommended guide belongs to the default model; {cfg.checkpoint} is sampled unguided")
        cfg = replace(cfg, guide=GuideConfig())
    if cfg.guide == RECOMMENDED_GUIDE and cfg.sampler.steps < FEWEST_GUIDED_STEPS:
        print(
            f"note: the default model's autoguidance was measured to help from ~{FEWEST_GUIDED_STEPS} steps on and to "
            "hurt below (checkpoints/edm_qm9_finetuned.md); --guide.checkpoint None samples it unguided"
        )
    return generate(cfg)


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
