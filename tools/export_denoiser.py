"""Export the sampler-ready denoiser (EMA weights by default) from a training-state checkpoint.

Usage:
    python tools/export_denoiser.py --input runs/edm_qm9_small/best.eqx --output checkpoints/edm_qm9_small.eqx
    python tools/export_denoiser.py --input runs/edm_qm9_small/last.eqx --output raw.eqx --which model

The output is a `denoiser` checkpoint (a few hundred KB for qm9-small) whose header keeps the model spec, the
source file and its training step; `recipes/pf_ode_sample.py --checkpoint OUT` samples from it.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from sde_mol import checkpoint, cli
from sde_mol.run.configs import to_dict
from sde_mol.run.load import load_denoiser


@dataclass(frozen=True)
class Config:
    input: Path
    """a train_state (or denoiser) checkpoint"""
    output: Path
    which: Literal["ema", "model"] = "ema"


def main(cfg: Config) -> None:
    denoiser, spec, header = load_denoiser(cfg.input, which=cfg.which)
    config = {
        "spec": to_dict(spec),
        "source": {"file": str(cfg.input), "kind": header["kind"], "which": cfg.which, "step": header["step"]},
        "training": header["config"].get("full"),
    }
    checkpoint.save(cfg.output, denoiser, kind="denoiser", config=config, step=header["step"])
    print(
        f"wrote {cfg.output} ({cfg.output.stat().st_size / 1e6:.2f} MB): {cfg.which} weights at step {header['step']}"
    )


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
