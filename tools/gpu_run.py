"""One command for a lent GPU: benchmark, then train the committed run for the rest of a fixed budget.

Usage:
    # on the GPU machine, from the repository root (jax with CUDA support must be installed there)
    python tools/gpu_run.py --budget-minutes 12
    # the same plan on this CPU with tiny sizes: checks the commands, writes nothing back
    python tools/gpu_run.py --dry-run

Steps, each a subprocess (so a failure in one is reported and the next still runs):
1. `tools/benchmark.py` at the shipped model's shape and the paper's (train step, denoiser, sampling;
   ancestral and PF-ODE extrapolated from short runs) -> OUT/bench.json;
2. `recipes/train_edm.py <preset> --resume <state>` with the rest of the budget (less a margin for writing
   back) -> OUT/run/ (metrics.jsonl, last.eqx);
3. unless --dry-run or --no-write-back, OUT/run/last.eqx replaces <state> (atomically: copy, then rename), so
   the next session resumes from it; OUT/summary.json lists what ran, how long, and the step reached.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from sde_mol import cli

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    state: Path = ROOT / "checkpoints" / "edm_qm9_finetune.train_state.eqx"
    """the committed training state to continue (a train_state checkpoint of the preset)"""
    preset: str = "qm9-finetune"
    """the recipes/train_edm.py preset the state belongs to"""
    budget_minutes: float = 12.0
    """wall-clock for everything; training gets what the benchmark leaves, less --margin-minutes"""
    margin_minutes: float = 1.5
    train_args: tuple[str, ...] = ()
    """more flags for recipes/train_edm.py (e.g. the spec of a state that is not the preset's)"""
    out_dir: Path = Path("gpu_out")
    write_back: bool = True
    """replace --state by the trained state at the end"""
    dry_run: bool = False
    """tiny benchmark and 2 training steps on this machine; writes nothing back"""


def _run(cmd: list[str], log: Path, timeout: float | None) -> dict:
    t0 = time.perf_counter()
    print("+ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"cmd": cmd, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "log": str(log)}


def _header_step(path: Path) -> int:
    with open(path, "rb") as f:
        return int(json.loads(f.readline())["step"])


def main(cfg: Config) -> dict:
    t_start = time.perf_counter()
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    bench = [py, "tools/benchmark.py", "--json-out", str(out / "bench.json")]
    if cfg.dry_run:
        bench += ["--quick", "--which", "denoiser", "--repeats", "1"]
    else:
        bench += ["--configs", "qm9-finetune", "qm9-paper", "--ancestral-steps", "20", "--pf-ode-steps", "4"]
    steps = {"benchmark": _run(bench, out / "bench.log", timeout=60 * cfg.budget_minutes / 2)}

    start_step = _header_step(cfg.state)
    train = [py, "recipes/train_edm.py", cfg.preset, "--resume", str(cfg.state), "--out-dir", str(out / "run")]
    train += list(cfg.train_args)
    if cfg.dry_run:
        train += ["--train.steps", str(start_step + 2), "--eval.n-valid", "0", "--eval.n-samples", "0"]
        train += ["--data.n-train", "256"]
    else:
        left = cfg.budget_minutes - (time.perf_counter() - t_start) / 60 - cfg.margin_minutes
        train += ["--train.max-minutes", f"{max(left, 0.5):.2f}"]
    steps["train"] = _run(train, out / "train.log", timeout=60 * cfg.budget_minutes)

    last = out / "run" / "last.eqx"
    summary = {"steps": steps, "start_step": start_step, "wrote_back": False}
    if last.is_file():
        summary["end_step"] = _header_step(last)
        if cfg.write_back and not cfg.dry_run and summary["end_step"] > start_step:
            tmp = cfg.state.with_name(cfg.state.name + ".gpu.tmp")
            shutil.copyfile(last, tmp)
            os.replace(tmp, cfg.state)
            summary["wrote_back"] = True
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    cli.run(main, lambda: tyro.cli(Config))
