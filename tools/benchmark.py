"""Benchmark training, the denoiser and sampling of the EDM-style EGNN (issue 5), against the EDM reference.

Usage:
    # the full measurement: qm9-paper, qm9-finetune (the shipped 5 x 128 model) and qm9-small, every section,
    # EDM's step counts (1000 ancestral steps, PF-ODE heun 50). Hours on a 2-core CPU (one ancestral run of
    # qm9-paper is ~20 min there); minutes on a GPU.
    python tools/benchmark.py --json-out bench_full.json
    # training and denoiser only, all three configs (~15 min on a 2-core CPU)
    python tools/benchmark.py --which train denoiser
    # quick: qm9-small only, 2 repeats, sampling with reduced step counts, extrapolated and labelled so (~3 min CPU)
    python tools/benchmark.py --quick
    # choose: configs, sections, repeats, step counts (fewer steps are extrapolated from a two-point fit)
    python tools/benchmark.py --configs qm9-paper --which sample --ancestral-steps 20 --pf-ode-steps 4
    # the main job against the reference: recipes/sample.py end to end, first and second (cached) run
    python tools/benchmark.py --configs qm9-finetune qm9-small --which main_job
    # mixed precision on a GPU (bf16 compute, f32 master weights)
    python tools/benchmark.py --precision bf16

Prints a readable table and then ONE JSON object on the last line of stdout (also written to --json-out).

What is measured (batch --batch-size, default 64; real QM9 train-split molecules, so their real size mix):
* train: full optimiser steps through `train.make_step` + `EDMEpsLoss` (loss, backward, adaptive clipping,
  AMSGrad, EMA), state donated. "padded": every batch padded to 29 atoms. "buckets": per-bucket step times
  combined with the bucket frequencies of a real epoch (the batch mix of `--data.buckets 17 20 23 29`).
  "loop": consecutive steps over the real bucketed batch order with the background prefetch, as `run_loop`
  runs them (host batching and host-to-device copies included).
* denoiser: `EpsDenoiser.eps`, jitted and vmapped over the batch, in molecule-evaluations/s, padded to 29
  (as sampling runs it) and for the bucket mix.
* sample: `samplers.sample_molecules` end to end (sizes from p(M), prior, sampler, final decode, copy to the
  host), molecules/s: ancestral (1000 steps), PF-ODE heun (50 steps), one network call from noise, and two
  calls (one DDIM step + the final x0 estimate). With fewer steps than the full count, the time is measured
  at n/2 and n steps, the per-step cost is the slope, and the full-count time is EXTRAPOLATED from the
  line (marked "extrapolated" in the table and the JSON).
* main_job (not in the default sections): `recipes/sample.py` end to end in a fresh process, EDM's ancestral
  sampler at T = 200 steps on --main-job-molecules molecules in one batch (random weights of the config's
  shape; speed does not depend on them), run twice over an empty compilation cache: wall-clock of each run
  (start-up, loading, compilation or cache loading, sampling, scoring) and the recipe's steady molecules/s,
  against the reference's wall-clock 0.45 mol/s (EDM_REFERENCE_SAMPLING, or --reference-sample-mol-per-s).
Every number is the median of --repeats timed runs after a warm-up. Compile time is measured separately: for
training, first call minus the median step; for the rest, an ahead-of-time `.lower(...).compile()` of the
same jitted function, which also warms the cache. "xla compiles" counts XLA backend compilations (JAX
monitoring events) in each section, "traces" the traces of the training step. Memory: the process's peak
host RSS so far (`resource.getrusage`; monotone, so a later section includes the earlier ones) and, on a
GPU, the device's peak bytes in use so far (`memory_stats`).

Reference: EDM's PyTorch code on a 2-core CPU of this kind, batch 64 of QM9-sized molecules (constants below).
"""

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

from sde_mol import samplers
from sde_mol.data.loader import BatchIterator
from sde_mol.data.qm9 import QM9_BUCKETS, load_qm9
from sde_mol.host_memory import keep_freed_memory
from sde_mol.molecule import Molecule
from sde_mol.objectives.denoising import EDMEpsLoss
from sde_mol.run.build import build_denoiser, dataset_info, optimizer_from
from sde_mol.run.configs import ModelConfig, ModelSpec, OptimConfig
from sde_mol.training.prefetch import prefetch, to_device
from sde_mol.training.state import cast_params, count_params, init_state, make_step

ConfigName = Literal["qm9-paper", "qm9-finetune", "qm9-small"]
Section = Literal["train", "denoiser", "sample", "main_job"]

# The presets of recipes/train_edm.py (network and optimiser; the SDE is EDM's default).
PRESETS: dict[str, tuple[ModelConfig, OptimConfig]] = {
    "qm9-paper": (ModelConfig(hidden=256, n_layers=9), OptimConfig()),
    "qm9-finetune": (ModelConfig(hidden=128, n_layers=5), OptimConfig(ema_decay=0.9999)),  # the shipped model
    "qm9-small": (ModelConfig(hidden=64, n_layers=4), OptimConfig(lr=5e-4, ema_decay=0.999)),
}

# EDM PyTorch reference on a 2-core CPU, batch 64 of QM9-sized molecules: full training step (mol/s) and the
# denoiser alone (molecule-evaluations/s).
EDM_REFERENCE = {
    "qm9-paper": {"train_mol_per_s": 3.5, "denoiser_evals_per_s": 10.4},
    "qm9-finetune": {"train_mol_per_s": 31.7, "denoiser_evals_per_s": 159.6},  # 5 layers x 128
    "qm9-small": {"train_mol_per_s": 85.0, "denoiser_evals_per_s": 413.0},
}
# The reference's sampling (the main job): EDM's ancestral sampler at T = 200 steps, 50 molecules from p(M) in
# one batch, wall-clock of its sampling script on a 2-core CPU (5 layers x 128, the shipped model's shape).
EDM_REFERENCE_SAMPLING = {"qm9-finetune": {"ancestral_200_mol_per_s": 0.45}}

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclass(frozen=True)
class Config:
    configs: tuple[ConfigName, ...] | None = None
    """model configurations (default: all three; with --quick: qm9-small)"""
    which: tuple[Section, ...] = ("train", "denoiser", "sample")
    batch_size: int = 64
    repeats: int | None = None
    """timed runs per measurement, median reported (default 5; --quick: 2)"""
    buckets: tuple[int, ...] = QM9_BUCKETS
    ancestral_steps: int | None = None
    """ancestral steps to run (default 1000; --quick: 10); fewer than 1000 -> two-point fit, extrapolated"""
    pf_ode_steps: int | None = None
    """PF-ODE heun steps to run (default 50; --quick: 4); fewer than 50 -> two-point fit, extrapolated"""
    loop_steps: int | None = None
    """steps of the end-to-end loop measurement (default 16; --quick: 8)"""
    sample_repeats: int | None = None
    """timed runs per sampler (default 3, as one full ancestral run of qm9-paper takes ~20 min on 2 CPU cores;
    --quick: 2)"""
    sample_molecules: int = 256
    """molecules per timed sampling run (sizes from p(M), grouped into --buckets, batches of --batch-size)"""
    precision: Literal["f32", "bf16"] = "f32"
    """bf16: network compute in bfloat16 with float32 master weights (meant for GPUs; slow on most CPUs)"""
    donate: bool = True
    """donate the train state to the step (in-place update)"""
    keep_freed_memory: bool = True
    """as the recipes run (`sde_mol.host_memory`): XLA's CPU buffers reused, not faulted in on every call;
    --no-keep-freed-memory measures glibc's defaults (main_job: passes SDE_MOL_KEEP_FREED_MEMORY=off)"""
    main_job_molecules: int = 50
    """main_job: molecules per run of recipes/sample.py (EDM's ancestral sampler, 200 steps, one batch)"""
    reference_sample_mol_per_s: float | None = None
    """main_job: the reference's molecules/s to compare with (default: EDM_REFERENCE_SAMPLING where stored)"""
    quick: bool = False
    seed: int = 0
    json_out: Path | None = None


FULL_STEPS = {"ancestral": 1000, "pf_ode_heun": 50}


def resolve(cfg: Config) -> dict:
    q = cfg.quick
    return dict(
        configs=cfg.configs or (("qm9-small",) if q else ("qm9-paper", "qm9-finetune", "qm9-small")),
        repeats=cfg.repeats or (2 if q else 5),
        ancestral=cfg.ancestral_steps or (10 if q else FULL_STEPS["ancestral"]),
        pf_ode_heun=cfg.pf_ode_steps or (4 if q else FULL_STEPS["pf_ode_heun"]),
        loop_steps=cfg.loop_steps or (8 if q else 16),
        sample_repeats=cfg.sample_repeats or (2 if q else 3),
        compute_dtype=jnp.bfloat16 if cfg.precision == "bf16" else None,
    )


# ------------------------------------------------------------------------------------------------ helpers


class CompileLog:
    """Counts XLA backend compilations (and their seconds) through JAX's monitoring events."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.events.append((str(kwargs.get("fun_name", "?")), duration))

    def since(self, mark: int) -> dict:
        new = self.events[mark:]
        return {"xla_compiles": len(new), "xla_compile_s": round(sum(d for _, d in new), 3)}


def memory() -> dict:
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    stats = jax.local_devices()[0].memory_stats()
    if stats:
        out["device_peak_mib"] = round(stats.get("peak_bytes_in_use", 0) / 2**20, 1)
        out["device_in_use_mib"] = round(stats.get("bytes_in_use", 0) / 2**20, 1)
    return out


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn, each waited for (block_until_ready)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return times


def summary(times: list[float], per_call_items: int) -> dict:
    med = float(np.median(times))
    return {"median_s": med, "per_s": per_call_items / med, "times_s": [round(t, 4) for t in times]}


def real_batches(iterator: BatchIterator, n: int) -> dict[int, list]:
    """Up to n real host batches per capacity, in the epoch-0 order."""
    out: dict[int, list] = {}
    for idx, weight, cap in iterator.plan(0):
        if len(out.setdefault(cap, [])) < n:
            out[cap].append(iterator.take(idx, weight, cap))
    return out


def bucket_fractions(iterator: BatchIterator) -> dict[int, float]:
    caps = np.array([cap for _, _, cap in iterator.plan(0)])
    return {int(c): float(np.mean(caps == c)) for c in iterator.buckets}


# ------------------------------------------------------------------------------------------------ train


def bench_train(name: str, spec, optim, data, r, cfg: Config, log: CompileLog) -> dict:
    info = dataset_info()
    opt = optimizer_from(optim)
    step = make_step(
        EDMEpsLoss(info), opt, ema_decay=optim.ema_decay, donate=cfg.donate, compute_dtype=r["compute_dtype"]
    )
    state = init_state(build_denoiser(spec, key=jr.PRNGKey(cfg.seed)), opt)
    key = jr.PRNGKey(cfg.seed)
    mark = log.since(0)["xla_compiles"]
    per_cap = {}

    def measure(batches):
        nonlocal state
        device = [to_device(b) for b in batches]
        t0 = time.perf_counter()
        state, aux = step(state, *device[0], key)
        jax.block_until_ready((state, aux))
        first = time.perf_counter() - t0
        it = iter(device[1:] * 2)

        def one():
            nonlocal state
            state, aux = step(state, *next(it), key)
            return state, aux

        s = summary(timed(one, r["repeats"]), cfg.batch_size)
        return {**s, "compile_s": round(first - s["median_s"], 3)}

    for cap, batches in data["padded"].items():
        per_cap[f"padded_{cap}"] = measure(batches)
    for cap, batches in sorted(data["bucketed"].items()):
        per_cap[f"bucket_{cap}"] = measure(batches)
    fractions = data["fractions"]
    mean_step = sum(f * per_cap[f"bucket_{c}"]["median_s"] for c, f in fractions.items())
    loop = bench_loop(step, state, data["loop"], key, cfg.batch_size)
    state = loop.pop("state")
    padded = per_cap[f"padded_{max(data['padded'])}"]
    ref = EDM_REFERENCE[name]["train_mol_per_s"]
    return {
        "padded_mol_per_s": padded["per_s"],
        "buckets_mol_per_s": cfg.batch_size / mean_step,
        "loop_mol_per_s": loop["mol_per_s"],
        "bucket_fractions": fractions,
        "per_capacity": per_cap,
        "loop": loop,
        "compile_s_per_shape": {k: v["compile_s"] for k, v in per_cap.items()},
        "step_traces": step.num_traces(),
        **log.since(mark),
        "edm_reference_mol_per_s": ref,
        **memory(),
    }


def bench_loop(step, state, host_batches: list, key, batch_size: int) -> dict:
    """Consecutive steps over real bucketed batches in epoch order, with the background prefetch."""
    it = prefetch((to_device(b) for b in host_batches), 2)
    t0 = time.perf_counter()
    for _ in range(len(host_batches)):
        state, aux = step(state, *next(it), key)
    jax.block_until_ready((state, aux))
    dt = time.perf_counter() - t0
    it.close()
    return {"steps": len(host_batches), "seconds": dt, "mol_per_s": len(host_batches) * batch_size / dt, "state": state}


# ------------------------------------------------------------------------------------------------ denoiser


@eqx.filter_jit
def _eps_batch(denoiser, t, z: Molecule, mask):
    return jax.vmap(denoiser.eps)(t, z, mask)


def bench_denoiser(name: str, spec, data, r, cfg: Config, log: CompileLog) -> dict:
    den = build_denoiser(spec, key=jr.PRNGKey(cfg.seed))
    if r["compute_dtype"] is not None:
        den = cast_params(den, r["compute_dtype"])
    mark = log.since(0)["xla_compiles"]
    per_cap = {}
    groups = {f"padded_{c}": b for c, b in data["padded"].items()}
    groups.update({f"bucket_{c}": b for c, b in sorted(data["bucketed"].items())})
    for group, batches in groups.items():
        mols, masks, _ = to_device(batches[0])
        t = jr.uniform(jr.PRNGKey(1), (cfg.batch_size,))
        noise = Molecule(jr.normal(jr.PRNGKey(2), mols.positions.shape), jr.normal(jr.PRNGKey(3), mols.features.shape))
        args = (den, t, mols + 0.5 * noise, masks)
        t0 = time.perf_counter()
        _eps_batch.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        s = summary(timed(lambda a=args: _eps_batch(*a), r["repeats"]), cfg.batch_size)
        per_cap[group] = {**s, "compile_s": round(compile_s, 3)}
    mean = sum(f * per_cap[f"bucket_{c}"]["median_s"] for c, f in data["fractions"].items())
    return {
        "padded_evals_per_s": per_cap[f"padded_{max(data['padded'])}"]["per_s"],
        "buckets_evals_per_s": cfg.batch_size / mean,
        "per_capacity": per_cap,
        **log.since(mark),
        "edm_reference_evals_per_s": EDM_REFERENCE[name]["denoiser_evals_per_s"],
        **memory(),
    }


# ------------------------------------------------------------------------------------------------ sampling


def sampler_fns(den, n_feat: int) -> dict[str, Callable[[int], eqx.Partial]]:
    """one_call: x0 = D(t_max, z), z ~ prior (a one-step consistency sampler: the cost of one network call)."""
    return {
        "ancestral": lambda n: eqx.Partial(samplers.Ancestral(n), den, n_feat=n_feat),
        "pf_ode_heun": lambda n: eqx.Partial(samplers.PFODE(dfx.Heun(), n), den, n_feat=n_feat),
        "one_call": lambda n: eqx.Partial(samplers.Consistency(), den, n_feat=n_feat),
        "two_call": lambda n: eqx.Partial(samplers.DDIM(1), den, n_feat=n_feat),
    }


def time_sampler(fn, info, cfg: Config, repeats: int) -> dict:
    """`samplers.sample_molecules` of --sample-molecules molecules (size-bucketed as the sampling recipes run
    it, batch --batch-size), compiled ahead of time first."""
    b, n = cfg.batch_size, cfg.sample_molecules
    buckets = cfg.buckets or None
    key = jr.PRNGKey(cfg.seed)
    t0 = time.perf_counter()
    samplers.compile_sampler(fn, n, info, key=key, batch_size=b, buckets=buckets)
    compile_s = time.perf_counter() - t0
    runs = timed(
        lambda: samplers.sample_molecules(fn, n, info, key=key, batch_size=b, buckets=buckets).positions, repeats
    )
    res = samplers.sample_molecules(fn, n, info, key=key, batch_size=b, buckets=buckets)
    return {**summary(runs, n), "compile_s": round(compile_s, 3), "nfe": int(res.nfe[0])}


def bench_sample(spec, r, cfg: Config, log: CompileLog) -> dict:
    info = dataset_info()
    den = build_denoiser(spec, key=jr.PRNGKey(cfg.seed))
    if r["compute_dtype"] is not None:
        den = cast_params(den, r["compute_dtype"])
    mark = log.since(0)["xla_compiles"]
    out = {}
    for name, make in sampler_fns(den, info.n_feat).items():
        full = FULL_STEPS.get(name)
        steps = r.get(name)
        if full is None or steps >= full:
            res = time_sampler(make(full), info, cfg, r["sample_repeats"])
            res.update(steps=full, extrapolated=False, mol_per_s=res["per_s"])
            if full:
                res["per_step_s"] = res["median_s"] / full
        else:  # two-point fit t(n) = fixed + n * per_step, extrapolated to the full step count
            lo, hi = max(1, steps // 2), steps
            a = time_sampler(make(lo), info, cfg, r["sample_repeats"])
            b = time_sampler(make(hi), info, cfg, r["sample_repeats"])
            per_step = (b["median_s"] - a["median_s"]) / (hi - lo)
            fit = per_step > 0  # timing noise can swamp a small step difference: then the bound t(hi) / hi
            per_step = per_step if fit else b["median_s"] / hi
            fixed = b["median_s"] - hi * per_step if fit else 0.0
            t_full = fixed + full * per_step
            res = dict(steps=full, measured_steps=[lo, hi], measured=[a, b], extrapolated=True)
            res.update(extrapolation="two-point fit" if fit else "t(hi) / hi (fit failed: timing noise)")
            res.update(per_step_s=per_step, fixed_s=fixed, median_s=t_full, mol_per_s=cfg.sample_molecules / t_full)
            res["nfe"] = b["nfe"] + (full - hi) * (b["nfe"] - a["nfe"]) // (hi - lo)
        out[name] = res
    return {"samplers": out, **log.since(mark), **memory()}


def bench_main_job(name: str, spec: ModelSpec, cfg: Config) -> dict:
    """The user's main job end to end: `recipes/sample.py` in a fresh process (EDM's ancestral sampler at T = 200
    steps, --main-job-molecules molecules in one batch) on a checkpoint of this shape, twice over an empty
    compilation cache: the first run compiles, the second loads the compiled programs. Reports each run's
    wall-clock (process start to exit) and steady-state molecules/s (the recipe's own, compilation excluded)."""
    import dataclasses
    import subprocess
    import tempfile

    from sde_mol import checkpoint
    from sde_mol.run.configs import to_dict

    spec = dataclasses.replace(spec, sde=dataclasses.replace(spec.sde, timesteps=200))
    n = cfg.main_job_molecules
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.eqx"
        checkpoint.save(
            ckpt, build_denoiser(spec, key=jr.PRNGKey(cfg.seed)), kind="denoiser", config={"spec": to_dict(spec)}
        )
        runs = []
        for run in ("first", "second"):
            out = Path(tmp) / run
            cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "recipes" / "sample.py")]
            cmd += ["--checkpoint", str(ckpt), "--sampler.sampler", "ancestral", "--sampler.steps", "200"]
            cmd += ["--n-samples", str(n), "--batch-size", str(n), "--no-novelty", "--quiet", "--out-dir", str(out)]
            env = dict(os.environ, SDE_MOL_COMPILE_CACHE=str(Path(tmp) / "xla"))
            if not cfg.keep_freed_memory:
                env["SDE_MOL_KEEP_FREED_MEMORY"] = "off"
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            m = json.loads((out / "metrics.json").read_text())
            runs.append(
                {
                    "run": run,
                    "wall_s": wall,
                    "wall_mol_per_s": n / wall,
                    "steady_mol_per_s": m["molecules_per_second"],
                    "compile_s": m["compile_seconds"],
                }
            )
    ref = cfg.reference_sample_mol_per_s or EDM_REFERENCE_SAMPLING.get(name, {}).get("ancestral_200_mol_per_s")
    out = {"molecules": n, "steps": 200, "runs": runs, "second_run_saves_s": runs[0]["wall_s"] - runs[1]["wall_s"]}
    if ref:
        out.update(
            edm_reference_mol_per_s=ref,
            steady_speedup=runs[0]["steady_mol_per_s"] / ref,
            wall_speedup_first_run=runs[0]["wall_mol_per_s"] / ref,
            wall_speedup_second_run=runs[1]["wall_mol_per_s"] / ref,
        )
    return out


# ------------------------------------------------------------------------------------------------ report


def load_data(cfg: Config, r: dict) -> dict:
    info = dataset_info()
    train = load_qm9("train")
    padded = BatchIterator(train, info, cfg.batch_size, seed=cfg.seed)
    bucketed = BatchIterator(train, info, cfg.batch_size, seed=cfg.seed, buckets=cfg.buckets)
    n = r["repeats"] + 1
    loop = [bucketed.take(idx, w, cap) for idx, w, cap in bucketed.plan(1)[: r["loop_steps"]]]
    return {
        "padded": real_batches(padded, n),
        "bucketed": real_batches(bucketed, n),
        "fractions": bucket_fractions(bucketed),
        "loop": loop,
        "mean_atoms": float(train.n_atoms.mean()),
    }


def table(results: dict) -> str:
    rows = [("config", "measurement", "ours", "unit", "EDM ref", "speed-up", "compile s")]

    def add(cfg, what, value, unit, ref=None, compile_s=None):
        speed = f"{value / ref:.1f}x" if ref else ""
        comp = "" if compile_s is None else f"{compile_s:.1f}"
        rows.append((cfg, what, f"{value:.2f}", unit, f"{ref}" if ref else "", speed, comp))

    for name, res in results.items():
        if "train" in res:
            t = res["train"]
            ref, comp = t["edm_reference_mol_per_s"], t["compile_s_per_shape"]
            add(name, "train step, padded to 29", t["padded_mol_per_s"], "mol/s", ref, comp.get("padded_29"))
            add(
                name,
                "train step, bucket mix",
                t["buckets_mol_per_s"],
                "mol/s",
                ref,
                sum(comp.values()) - comp.get("padded_29", 0),
            )
            add(name, f"train loop, {t['loop']['steps']} steps", t["loop_mol_per_s"], "mol/s", ref)
        if "denoiser" in res:
            d = res["denoiser"]
            ref = d["edm_reference_evals_per_s"]
            pc = d["per_capacity"]
            add(name, "denoiser, padded to 29", d["padded_evals_per_s"], "evals/s", ref, pc["padded_29"]["compile_s"])
            add(name, "denoiser, bucket mix", d["buckets_evals_per_s"], "evals/s", ref)
        if "sample" in res:
            for sname, s in res["sample"]["samplers"].items():
                label = f"sample {sname}" + (f" {s['steps']} steps" if s.get("steps") else "") + f" (nfe {s['nfe']})"
                if s["extrapolated"]:
                    label += f" EXTRAPOLATED from {s['measured_steps']}"
                comp = s.get("compile_s", None) if not s["extrapolated"] else s["measured"][1]["compile_s"]
                add(name, label, s["mol_per_s"], "mol/s", None, comp)
        if "main_job" in res:
            job = res["main_job"]
            ref = job.get("edm_reference_mol_per_s")
            first, second = job["runs"]
            add(
                name, f"main job ancestral 200, {job['molecules']} mol, steady", first["steady_mol_per_s"], "mol/s", ref
            )
            add(name, "main job, wall-clock, first run", first["wall_mol_per_s"], "mol/s", ref, first["compile_s"])
            add(name, "main job, wall-clock, second run", second["wall_mol_per_s"], "mol/s", ref, second["compile_s"])
        mem = res.get("memory", {})
        rows.append((name, "peak host RSS so far", f"{mem.get('peak_rss_mib', 0):.0f}", "MiB", "", "", ""))
        if "device_peak_mib" in mem:
            rows.append((name, "peak device memory so far", f"{mem['device_peak_mib']:.0f}", "MiB", "", "", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(cfg: Config) -> dict:
    kept = keep_freed_memory() if cfg.keep_freed_memory else False  # before JAX starts its backend
    r = resolve(cfg)
    log = CompileLog()
    dev = jax.local_devices()[0]
    meta = {
        "device": f"{dev.platform}:{dev.device_kind}",
        "n_devices": jax.device_count(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "loadavg_start": os.getloadavg(),
        "keep_freed_memory": kept,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "resolved": {k: v for k, v in r.items() if k != "compute_dtype"},
    }
    data = load_data(cfg, r) if {"train", "denoiser"} & set(cfg.which) else None
    results = {}
    for name in r["configs"]:
        model, optim = PRESETS[name]
        spec = ModelSpec(model)
        res = {"params": count_params(build_denoiser(spec, key=jr.PRNGKey(0)))}
        if "train" in cfg.which:
            res["train"] = bench_train(name, spec, optim, data, r, cfg, log)
        if "denoiser" in cfg.which:
            res["denoiser"] = bench_denoiser(name, spec, data, r, cfg, log)
        if "sample" in cfg.which:
            res["sample"] = bench_sample(spec, r, cfg, log)
        if "main_job" in cfg.which:
            res["main_job"] = bench_main_job(name, spec, cfg)
        res["memory"] = memory()
        results[name] = res
    meta["loadavg_end"] = os.getloadavg()
    report = {"meta": meta, "edm_reference": EDM_REFERENCE, "results": results}
    print(table(results))
    line = json.dumps(report, default=float)
    if cfg.json_out is not None:
        cfg.json_out.write_text(json.dumps(report, indent=2, default=float))
    print(line)
    return report


if __name__ == "__main__":
    main(tyro.cli(Config))
