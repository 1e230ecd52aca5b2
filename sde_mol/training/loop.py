"""The one Python training loop: steps, logging (metrics.jsonl, strict JSON), evaluation, best/last checkpoints,
a time budget, and a stop with a report when the loss turns non-finite. The data order of epoch e is a seeded
shuffle and step k's key is `fold_in(base_key, k)`, so a resumed run continues exactly as an uninterrupted one.
"""

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.random as jr

from ..checkpoint import remove_stale_temp_files
from . import distributed
from .prefetch import Prefetch, prefetch
from .state import TrainState


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 10_000
    """total optimiser steps (a resumed run counts from its checkpoint's step)"""
    max_minutes: float | None = None
    """wall-clock budget for this invocation; the run checkpoints and stops cleanly when it is spent"""
    log_every: int = 50
    eval_every: int = 2000
    ckpt_every: int = 1000
    seed: int = 0
    prefetch: int = 2
    """device batches prepared ahead in a background thread while the step runs (0 = inline)"""
    data_parallel: bool = False
    """shard every batch over all devices (jax.devices(), all hosts after `distributed.initialise()`),
    parameters replicated; the batch size must be divisible by the device count"""
    eval_at_start: bool = False
    """evaluate once before the first step of a fresh run (the starting point of the curve)"""
    precision: Literal["f32", "bf16"] = "f32"
    """network compute dtype (bf16: mixed precision with float32 master weights; for GPUs, slow on most CPUs).
    Read by the recipe when it builds the step (`compute_dtype_from`)"""


def _progress_line(step, total, t_start, step_start, batch_size, aux, eta_budget):
    dt = time.perf_counter() - t_start
    done = step - step_start
    sps = done / dt if dt > 0 else 0.0
    remaining = (total - step) / sps if sps > 0 else float("inf")
    if eta_budget is not None:
        remaining = min(remaining, eta_budget)
    eta = "?" if not math.isfinite(remaining) else time.strftime("%H:%M:%S", time.gmtime(remaining))
    return (
        f"step {step}/{total}  loss {aux['loss']:.4f}  {sps:.2f} steps/s  {sps * batch_size:.1f} mol/s  ETA {eta}",
        sps,
    )


def run_loop(
    state: TrainState,
    step_fn: Callable,
    batches: Callable[[int], Iterator],
    *,
    cfg: LoopConfig,
    out_dir: Path,
    save: Callable[[Path, TrainState], None],
    evaluate: Callable[[TrainState], dict[str, float]] | None = None,
    best_key: str | None = None,
    batch_size: int,
    to_device: Callable[..., tuple],
) -> TrainState:
    """The one Python training loop: steps, progress line, metrics.jsonl, periodic evaluation, checkpoints
    (last.eqx always; best.eqx by `best_key`, lower is better), wall-clock budget, resume by `state.step`.

    `batches(start_step)` yields host batches from the given global step on (so resume is exact);
    `to_device(batch)` turns one into the step function's (mols, masks, weights) arguments; with
    `cfg.data_parallel` it is called as `to_device(batch, mesh=mesh)` (as `train.to_device` accepts) and the
    state is replicated over the mesh first. `cfg.prefetch` batches are prepared ahead in a background thread.
    With several processes (`distributed.initialise`) every process runs this loop over the same seeded
    batches and uploads its own rows; only process 0 writes files and prints."""
    main_process = jax.process_index() == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    key = jr.PRNGKey(cfg.seed)
    start = int(state.step)
    t_start = time.perf_counter()
    deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes else None
    best = _read_best(out_dir, best_key)
    put = to_device
    if cfg.data_parallel:
        mesh = distributed.data_mesh()
        if batch_size % mesh.size:
            raise ValueError(f"data_parallel: batch size {batch_size} is not divisible by {mesh.size} devices")
        state = distributed.replicate(state, mesh)

        def put(batch):
            return to_device(batch, mesh=mesh)

    device_batches = (put(b) for b in batches(start))
    it = prefetch(device_batches, cfg.prefetch) if cfg.prefetch > 0 else device_batches

    if main_process:
        _truncate_log(out_dir / "metrics.jsonl", start)
        for stale in remove_stale_temp_files(out_dir):
            print(f"removed {stale}, a temp file of an interrupted checkpoint write", flush=True)

    def record(obj):
        if main_process:
            with open(out_dir / "metrics.jsonl", "a") as log:
                log.write(json.dumps(_jsonable(obj), allow_nan=False) + "\n")

    def checkpoint(name, st):
        if main_process:
            save(out_dir / name, st)

    def run_evaluation(st, at_step):
        nonlocal best
        metrics = evaluate(st)
        record({"step": at_step, "time": time.time(), "eval": metrics})
        if main_process:
            print(f"eval @ {at_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        if best_key is not None and metrics.get(best_key) is not None and metrics[best_key] < best:
            best = metrics[best_key]
            checkpoint("best.eqx", st)
            if main_process:
                (out_dir / "best.json").write_text(json.dumps({"step": at_step, best_key: best}))

    step = start
    if evaluate is not None and cfg.eval_at_start and not (out_dir / "metrics.jsonl").exists():
        run_evaluation(state, step)
    try:
        while step < cfg.steps:
            state, aux = step_fn(state, *next(it), key)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                aux = {k: float(v) for k, v in aux.items()}
                if not math.isfinite(aux["loss"]):
                    _report_divergence(out_dir, step, aux, main_process)
                    checkpoint("nan_state.eqx", state)
                    raise FloatingPointError(
                        f"loss is {aux['loss']} at step {step}: see {out_dir / 'nan_report.json'}; the last good "
                        f"state is {out_dir / 'last.eqx'} (the diverged one: nan_state.eqx, load it with "
                        "allow_nonfinite=True)"
                    )
                eta_budget = None if deadline is None else deadline - time.perf_counter()
                line, sps = _progress_line(step, cfg.steps, t_start, start, batch_size, aux, eta_budget)
                if main_process:
                    print(line, flush=True)
                record({"step": step, "time": time.time(), "steps_per_s": sps, **aux})
            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                run_evaluation(state, step)
            out_of_time = deadline is not None and time.perf_counter() > deadline
            if step % cfg.ckpt_every == 0 or step == cfg.steps or out_of_time:
                checkpoint("last.eqx", state)
            if out_of_time:
                if main_process:
                    print(
                        f"wall-clock budget of {cfg.max_minutes:.4g} min spent at step {step}; resume with --resume "
                        f"{out_dir / 'last.eqx'}",
                        flush=True,
                    )
                break
    finally:
        if isinstance(it, Prefetch):
            it.close()
    return state


def _json_number(v: float) -> float | str:
    """A float as JSON allows it: NaN and infinities become the strings "nan", "inf", "-inf"."""
    return v if math.isfinite(v) else str(v)


def _jsonable(obj):
    """`obj` (nested dicts of numbers) with every non-finite float as a string: metrics.jsonl stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return _json_number(obj) if isinstance(obj, float) else obj


def _report_divergence(out_dir: Path, step: int, aux: dict[str, float], main_process: bool) -> None:
    """nan_report.json (valid JSON: non-finite numbers as strings) and a metrics.jsonl row for the step at
    which the loss stopped being finite; last.eqx keeps the last good state."""
    report = _jsonable({"step": step, "time": time.time(), "diverged": True, **aux})
    if main_process:
        (out_dir / "nan_report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        with open(out_dir / "metrics.jsonl", "a") as log:
            log.write(json.dumps(report, allow_nan=False) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop the rows of an earlier run's metrics.jsonl logged after `step` (a run resumed from an older
    checkpoint logs those steps again); written atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def _read_best(out_dir: Path, best_key: str | None) -> float:
    path = out_dir / "best.json"
    if best_key is None or not path.is_file():
        return float("inf")
    return float(json.loads(path.read_text()).get(best_key, float("inf")))
