"""Sample molecules with any sampler (EDM ancestral, DDIM, PF-ODE, reverse SDE), write SDF/XYZ + metrics.json.

Usage:
    python recipes/sample.py --sampler.sampler ancestral --sampler.steps 1000 --n-samples 1000
    python recipes/sample.py --sampler.sampler ddim --sampler.steps 100 --out-dir samples/ddim100
    python recipes/sample.py --sampler.sampler ddim --sampler.steps 100 --sampler.eta 1.0
    python recipes/sample.py --sampler.sampler reverse_sde --sampler.steps 500
    python recipes/sample.py --checkpoint runs/edm_qm9_small/best.eqx --dry-run
    python recipes/sample.py --checkpoint runs/pd_edm/student_4steps.eqx --sampler.sampler ddim --sampler.steps 4
    python recipes/sample.py --checkpoint runs/ldm_qm9/last.eqx --sampler.sampler ddim --sampler.steps 100

A progressive-distillation student samples with DDIM at its own step count (its header records it; another
choice runs, with a note). Latent models (recipes/train_latent.py) sample latents and decode them.
"""

from dataclasses import dataclass
from pathlib import Path

import tyro

from sde_mol import cli
from sde_mol.run.sample import GenerateConfig, generate

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "edm_qm9_finetuned.eqx"


@dataclass(frozen=True)
class Config(GenerateConfig):
    checkpoint: Path = DEFAULT_CHECKPOINT
    """an sde_mol checkpoint (.eqx): a denoiser, or a training state (its EMA model); default: the shipped
    model, checkpoints/edm_qm9_finetuned.eqx (see its model card)"""


def main(cfg: Config) -> dict:
    return generate(cfg)


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
