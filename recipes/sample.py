"""Sample molecules with any sampler (EDM ancestral, DDIM, PF-ODE, reverse SDE), write SDF/XYZ + metrics.json.

Usage:
    python recipes/sample.py --sampler.sampler ancestral --sampler.steps 1000 --n-samples 1000
    python recipes/sample.py --sampler.sampler ddim --sampler.steps 100 --out-dir samples/ddim100
    python recipes/sample.py --sampler.sampler ddim --sampler.steps 100 --sampler.eta 1.0
    python recipes/sample.py --sampler.sampler reverse_sde --sampler.steps 500
    python recipes/sample.py --checkpoint runs/edm_qm9_small/best.eqx --dry-run
"""

import tyro

from sde_mol.generate import GenerateConfig, generate


def main(cfg: GenerateConfig) -> dict:
    return generate(cfg)


if __name__ == "__main__":
    main(tyro.cli(GenerateConfig))
