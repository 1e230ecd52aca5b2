"""Sample molecules by solving the probability-flow ODE with any diffrax solver, write SDF + metrics.json.

Usage:
    python recipes/pf_ode_sample.py --solver heun                      # shipped checkpoint, 100 molecules
    python recipes/pf_ode_sample.py --solver heun --steps 50 --n-samples 1000 --out-dir samples/heun50
    python recipes/pf_ode_sample.py --solver dopri5 --adaptive --rtol 1e-3 --atol 1e-3
    python recipes/pf_ode_sample.py --checkpoint runs/edm_qm9_small/best.eqx --grid karras --rho 7
    python recipes/pf_ode_sample.py --dry-run

The default checkpoint is checkpoints/edm_qm9_finetuned.eqx (see its model card). Any sde_mol checkpoint works: a
denoiser file, or a training state (its EMA model is used).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from sde_mol import cli
from sde_mol.data.qm9 import QM9_BUCKETS
from sde_mol.run.configs import SamplerConfig, SolverName
from sde_mol.run.sample import GenerateConfig, generate

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "edm_qm9_finetuned.eqx"


@dataclass(frozen=True)
class Config:
    checkpoint: Path = DEFAULT_CHECKPOINT
    """sde_mol checkpoint (.eqx): a denoiser, or a training state (its EMA model)"""
    solver: SolverName = "heun"
    """diffrax solver"""
    steps: int = 50
    """steps of the fixed time grid (adaptive: only sets the first step size)"""
    grid: Literal["uniform", "karras"] = "uniform"
    rho: float = 7.0
    """Karras grid exponent"""
    adaptive: bool = False
    """adaptive step size (PID controller) instead of the fixed grid"""
    continuous_time: bool = False
    """integrate an EDM discrete-table model on its continuous twin (the same network, continuous schedule)"""
    rtol: float = 1e-4
    atol: float = 1e-4
    max_steps: int = 4096
    """adaptive: the most solver steps before the solve stops with an error"""
    n_samples: int = 100
    batch_size: int = 100
    buckets: tuple[int, ...] = QM9_BUCKETS
    """size buckets: each molecule is sampled at the smallest width that holds it (empty: full width)"""
    seed: int = 0
    out_dir: Path | None = None
    """where samples.sdf and metrics.json go; default samples/pf_ode_<steps>"""
    format: Literal["sdf", "xyz", "both"] = "sdf"
    novelty: bool = True
    compile_cache: bool = True
    """use JAX's persistent compilation cache: a second run skips compilation"""
    quiet: bool = False
    """no progress bar"""
    overwrite: bool = False
    """replace the outputs of an earlier run in --out-dir (refused without it)"""
    dry_run: bool = False


def main(cfg: Config) -> dict:
    sampler = SamplerConfig(
        sampler="pf_ode",
        steps=cfg.steps,
        solver=cfg.solver,
        grid=cfg.grid,
        rho=cfg.rho,
        adaptive=cfg.adaptive,
        rtol=cfg.rtol,
        atol=cfg.atol,
        max_steps=cfg.max_steps,
    )
    return generate(
        GenerateConfig(
            checkpoint=cfg.checkpoint,
            sampler=sampler,
            continuous_time=cfg.continuous_time,
            n_samples=cfg.n_samples,
            batch_size=cfg.batch_size,
            buckets=cfg.buckets,
            seed=cfg.seed,
            out_dir=cfg.out_dir,
            format=cfg.format,
            novelty=cfg.novelty,
            compile_cache=cfg.compile_cache,
            quiet=cfg.quiet,
            overwrite=cfg.overwrite,
            dry_run=cfg.dry_run,
        )
    )


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
