"""The sampling job: draw molecules from a checkpoint, write them, score them (what every sampling recipe runs).

`generate(cfg)` loads any sde_mol checkpoint (a denoiser file, or a train_state file whose EMA model is used),
builds the sampler named by `cfg.sampler`, draws `cfg.n_samples` molecules with sizes from p(M), writes
samples.sdf (bonds as the metric infers them) and/or samples.xyz, computes EDM's metrics and writes
metrics.json and config.json into `cfg.out_dir`.

Throughput: the first batch includes compilation; `molecules_per_second` is measured on the batches after
it (or, with a single batch, on a second timed call of the compiled sampler on other keys).
"""

import csv
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jax.random as jr
import numpy as np

from .. import checkpoint, io, latent, metrics
from ..cli import UsageError
from ..compile_cache import enable_compile_cache
from ..data.qm9 import QM9_BUCKETS
from ..samplers import compile_sampler, sample_molecules
from .build import build_sampler, continuous_teacher, dataset_info
from .configs import GuideConfig, SamplerConfig, from_dict, to_dict
from .load import load_denoiser, with_guide

RECOMMENDED_SAMPLER = SamplerConfig(sampler="reverse_sde", steps=500)
"""The default sampler: EDM's models are limited by the network, not the sampler, from ~500 stochastic steps
on (the shipped model's card measures the trade-off)."""


@dataclass(frozen=True)
class GenerateConfig:
    checkpoint: Path
    """an sde_mol checkpoint (.eqx): a denoiser, or a training state (its EMA model)"""
    sampler: SamplerConfig = field(default_factory=lambda: RECOMMENDED_SAMPLER)
    guide: GuideConfig = field(default_factory=GuideConfig)
    """autoguidance by a weaker model (--guide.checkpoint, --guide.weight); off by default"""
    continuous_time: bool = False
    """sample an EDM discrete-table model (vp_discrete) on its continuous twin (the same network on the
    continuous polynomial schedule), so that any step count and grid is exact; other SDEs are unchanged"""
    n_samples: int = 100
    batch_size: int = 100
    buckets: tuple[int, ...] = QM9_BUCKETS
    """sample each molecule at the smallest of these widths that holds it (QM9's size buckets; the largest
    must be >= the dataset's maximum size); empty: every molecule at the full width"""
    seed: int = 0
    out_dir: Path | None = None
    """where samples.sdf and metrics.json go; default samples/<sampler>_<steps>"""
    format: Literal["sdf", "xyz", "both"] = "sdf"
    novelty: bool = True
    """score novelty against the QM9 train split's SMILES (cached after the first use, ~10 s)"""
    which: Literal["ema", "model"] = "ema"
    """for train_state checkpoints: the EMA model (default, as EDM samples) or the raw model"""
    compile_cache: bool = True
    """use JAX's persistent compilation cache (sde_mol/compile_cache.py): a second run skips compilation"""
    quiet: bool = False
    """no progress bar"""
    overwrite: bool = False
    """replace the outputs of an earlier run in --out-dir (refused without it)"""
    label: str = ""
    """a method name for this run in metrics.json, which `tools/plot.py tradeoff` and `table` group rows by
    (empty: the sampler name)"""
    dry_run: bool = False


OUTPUT_FILES = ("samples.sdf", "samples.xyz", "molecules.csv", "metrics.json", "config.json")


def _timed_sampling(cfg: GenerateConfig, sampler_fn, info):
    """Sample with compilation timed apart: molecules/s is the steady-state throughput of the sampling run."""
    key = jr.PRNGKey(cfg.seed)
    bs = min(cfg.batch_size, cfg.n_samples)
    buckets = cfg.buckets or None
    if not cfg.quiet:
        print("compiling the sampler (JAX's compilation cache makes this fast from the second run on)", flush=True)
    t0 = time.perf_counter()
    compile_sampler(sampler_fn, cfg.n_samples, info, key=key, batch_size=bs, buckets=buckets)
    t_compile = time.perf_counter() - t0
    t1 = time.perf_counter()
    samples = sample_molecules(
        sampler_fn, cfg.n_samples, info, key=key, batch_size=bs, buckets=buckets, progress=not cfg.quiet
    )
    seconds = time.perf_counter() - t1
    timing = {"molecules_per_second": cfg.n_samples / seconds, "seconds": seconds, "compile_seconds": t_compile}
    return samples, timing


def generate(cfg: GenerateConfig) -> dict:
    resolved = to_dict(cfg)
    print(json.dumps(resolved, indent=2, default=str))
    if cfg.dry_run:
        return {}
    out = default_out_dir(cfg) if cfg.out_dir is None else Path(cfg.out_dir)
    earlier = [name for name in OUTPUT_FILES if (out / name).exists()]
    if earlier and not cfg.overwrite:
        raise UsageError(
            f"--out-dir {out} already holds {', '.join(earlier)} of an earlier run; pass --overwrite to replace "
            "them, or choose another --out-dir"
        )
    enable_compile_cache(cfg.compile_cache)
    if not Path(cfg.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {cfg.checkpoint} does not exist (train one with recipes/train_edm.py)")
    own = own_sampler(checkpoint.read_header(Path(cfg.checkpoint)))
    if own is not None and cfg.sampler == RECOMMENDED_SAMPLER:  # no sampler flags: the student's own sampler
        print(f"sampling with the checkpoint's own sampler: {own.sampler}, {own.steps} steps, eta {own.eta}")
        cfg = dataclasses.replace(cfg, sampler=own)
        resolved = to_dict(cfg)
    if latent.is_latent(checkpoint.read_header(Path(cfg.checkpoint))):  # sample latents, decode them
        if cfg.guide.checkpoint is not None:
            raise UsageError(f"--guide.checkpoint: {cfg.checkpoint} is a latent model; guidance needs a denoiser")
        if cfg.continuous_time:
            raise UsageError(f"--continuous-time: {cfg.checkpoint} is a latent model; its SDE is already continuous")
        sampler_fn, spec, header = latent.load_latent_sampler(Path(cfg.checkpoint), cfg.sampler, which=cfg.which)
        info = dataset_info(spec.dataset)
    else:
        denoiser, spec, header = load_denoiser(Path(cfg.checkpoint), which=cfg.which)
        _check_parametrisation(spec.denoiser.parametrisation, cfg)
        if cfg.continuous_time:
            denoiser, spec = continuous_teacher(denoiser, spec)
        denoiser = with_guide(denoiser, spec, cfg.guide, continuous_time=cfg.continuous_time, which=cfg.which)
        info = dataset_info(spec.dataset)
        sampler_fn = build_sampler(cfg.sampler, denoiser, info.n_feat)
    _check_distilled_sampler(header, cfg.sampler)
    samples, timing = _timed_sampling(cfg, sampler_fn, info)
    out = default_out_dir(cfg) if cfg.out_dir is None else Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in earlier:  # --overwrite: no file of the earlier run stays beside the new ones
        (out / name).unlink()
    keep = samples.finite
    n_bad = int(np.size(keep) - np.count_nonzero(keep))
    if n_bad:
        print(
            f"warning: {n_bad} of {cfg.n_samples} sampled molecules have non-finite coordinates or features; "
            "they are counted as n_nonfinite, not written and not scored",
            file=sys.stderr,
        )
    pos, types = samples.positions[keep], samples.atom_types[keep]
    if not cfg.quiet:
        print("scoring: bonds, RDKit validity, novelty against the QM9 train SMILES (built once, cached)", flush=True)
    ref = metrics.train_smiles() if cfg.novelty and len(pos) else None
    if len(pos):
        table = metrics.molecule_table(pos, types, info.atom_decoder)
        result = {**metrics.scores_from_table(table, ref), "n_nonfinite": n_bad}
        rows = molecule_rows(table, np.flatnonzero(keep), samples.nfe[keep], cfg)
        _write_csv(out / "molecules.csv", rows)
        if cfg.format in ("sdf", "both"):
            io.write_sdf(out / "samples.sdf", pos, types, atom_decoder=info.atom_decoder, properties=rows)
        if cfg.format in ("xyz", "both"):
            io.write_xyz(out / "samples.xyz", pos, types, atom_decoder=info.atom_decoder)
    else:
        result = metrics.evaluate_samples(samples, ref, atom_decoder=info.atom_decoder)
    result.update(timing)
    result["nfe"] = float(np.mean(samples.nfe))
    result["checkpoint"] = str(cfg.checkpoint)
    result["checkpoint_step"] = header.get("step")
    result["sampler"] = to_dict(cfg.sampler)
    result["guide"] = None if cfg.guide.checkpoint is None else to_dict(cfg.guide)
    result["label"] = cfg.label or None
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
    print(metrics_table(result))
    print(f"wrote {len(pos)} molecules and metrics.json to {out}")
    return result


def molecule_rows(table: dict, index: np.ndarray, nfe: np.ndarray, cfg: GenerateConfig) -> list[dict]:
    """One row per written molecule (molecules.csv, and the SDF record's data fields): its index i (molecule i
    of this seed, reproducible on its own), the seed, EDM's per-molecule results, the sampler, NFE, checkpoint."""
    sampler = f"{cfg.sampler.sampler}/{cfg.sampler.steps}" + ("/twin" if cfg.continuous_time else "")
    return [
        {
            "index": int(i),
            "seed": cfg.seed,
            "n_atoms": int(table["n_atoms"][k]),
            "atom_stable_fraction": round(float(table["atom_stable_fraction"][k]), 4),
            "molecule_stable": int(table["molecule_stable"][k]),
            "valid": int(table["valid"][k]),
            "connected": int(table["connected"][k]),
            "smiles": table["smiles"][k],
            "sampler": sampler,
            "nfe": int(nfe[k]),
            "checkpoint": str(cfg.checkpoint),
        }
        for k, i in enumerate(index)
    ]


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _check_parametrisation(parametrisation: str, cfg: GenerateConfig) -> None:
    """The consistency sampler needs a consistency function (f(t, z) = x0 in one call); a denoiser sampled
    with it would give meaningless molecules, so it is refused."""
    consistency = parametrisation in ("consistency", "eps_consistency")
    if cfg.sampler.sampler == "consistency" and not consistency:
        raise UsageError(
            f"--sampler.sampler consistency: {cfg.checkpoint} is a {parametrisation!r} denoiser, not a consistency "
            "model; sample it with ancestral, ddim, pf_ode or reverse_sde"
        )


def default_out_dir(cfg: GenerateConfig) -> Path:
    """samples/<sampler>_<steps>[_twin][_guided]: runs of different samplers do not overwrite each other."""
    twin = "_twin" if cfg.continuous_time else ""
    guided = "_guided" if cfg.guide.checkpoint is not None else ""
    return Path("samples") / f"{cfg.sampler.sampler}_{cfg.sampler.steps}{twin}{guided}"


def own_sampler(header: dict) -> SamplerConfig | None:
    """The sampler a distilled checkpoint was trained for (header entry "distillation" of a progressive student,
    "consistency" of a consistency model), or None for a plain denoiser."""
    config = header["config"]
    own = config.get("consistency", config.get("distillation", {})).get("sampler")
    if own is None:
        return None
    if isinstance(own, dict) and {"sampler", "steps"} <= set(own):
        keep = {f.name for f in dataclasses.fields(SamplerConfig)}
        return from_dict(
            SamplerConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in own.items() if k in keep}
        )
    return None


def _check_distilled_sampler(header: dict, sampler: SamplerConfig) -> None:
    """A progressive-distillation student is a DDIM sampler at its own step count (and eta), a consistency
    model (header entry "consistency") a consistency sampler at any step count: say so when the requested
    sampler differs (it still runs)."""
    config = header["config"]
    own = config.get("consistency", {}).get("sampler")
    if own is not None:
        if sampler.sampler != own["sampler"]:
            print(
                f"note: this checkpoint is a consistency model, trained for --sampler.sampler {own['sampler']} "
                f"(--sampler.steps 1, 2, 4, ...); sampling with {sampler.sampler}"
            )
        return
    own = config.get("distillation", {}).get("sampler")
    if own is None:
        return
    if (sampler.sampler, sampler.steps, sampler.eta) != (own["sampler"], own["steps"], own["eta"]):
        print(
            f"note: this checkpoint is a distilled {own['steps']}-step student, trained for --sampler.sampler "
            f"{own['sampler']} --sampler.steps {own['steps']} --sampler.eta {own['eta']}; sampling with "
            f"{sampler.sampler} / {sampler.steps} steps / eta {sampler.eta}"
        )


def metrics_table(result: dict) -> str:
    rows = []
    for k in ("n_molecules", "n_nonfinite", *metrics.SAMPLE_METRICS):
        v = result.get(k)
        if v is None:
            continue
        rows.append(f"{k:<20} {v:>8}" if k.startswith("n_") else f"{k:<20} {100 * v:7.2f} %")
    rows.append(f"{'nfe':<20} {result['nfe']:8.1f}")
    if result.get("guide"):
        g = result["guide"]
        rows.append(f"{'guide':<20} {g['checkpoint']} (weight {g['weight']}, t in [{g['t_low']}, {g['t_high']}])")
    rows.append(f"{'molecules/s':<20} {result['molecules_per_second']:8.2f}")
    return "\n".join(rows)
