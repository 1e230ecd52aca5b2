"""What recipes/progressive_distill.py does at the end of each halving: write the student (the next round's
teacher) and, when asked, score it and its teacher on one fixed probe of molecules.

The probe. Round r's student (N steps) and its teacher (2N steps: the first teacher for r = 0, else round
r - 1's student, read back from its file or from students.json) are sampled with the same seed and scored with
EDM's metrics; `metrics.matches` says whether the student is within two standard errors of its teacher on
atom stability, molecule stability and validity. Every round trains its fixed budget (`--steps-per-round`);
the row says whether the student matched at the end of it. An exact-oracle teacher has no probe of its own.
"""

import json
from pathlib import Path
from typing import Literal

import optax

from .. import checkpoint, metrics
from ..denoisers import AbstractDenoiser
from ..sde import AbstractSDE
from .configs import ModelSpec, SamplerConfig, to_dict
from .recipe import checkpoint_teacher, score_sampler

ETA = {"ddim": 0.0, "ddpm": 1.0}
"""The DDIM eta of each step kind: deterministic DDIM (Salimans & Ho) or the stochastic DDPM step."""

StepKind = Literal["ddim", "ddpm"]


def halving_optimizer(base: optax.GradientTransformation, steps_per_round: int | None) -> optax.GradientTransformation:
    """`base` with its learning rate decayed linearly to 0 within each halving of `steps_per_round` steps
    (Salimans & Ho); None: `base` unchanged."""
    if steps_per_round is None:
        return base
    return optax.chain(base, optax.scale_by_schedule(lambda k: 1.0 - (k % steps_per_round) / steps_per_round))


def check_resolution(sde: AbstractSDE, teacher_steps: int) -> AbstractSDE:
    """`sde`, if a grid of `teacher_steps` steps is resolvable on it (a discrete table resolves at most its T)."""
    if sde.time_resolution is not None and teacher_steps > sde.time_resolution:
        raise ValueError(
            f"--teacher-steps {teacher_steps}: finer than the teacher's discrete schedule of {sde.time_resolution} "
            "steps (its grid nodes would repeat); add --continuous-time to distil on its continuous twin"
        )
    return sde


def student_sampler(n_steps: int, target: StepKind) -> SamplerConfig:
    """How a student distilled for `target` steps samples: DDIM with that step's eta at its own step count."""
    return SamplerConfig("ddim", steps=n_steps, eta=ETA[target])


def save_student(path: Path, den: AbstractDenoiser, autoencoder, *, config: dict, step: int) -> None:
    """A student file: kind "denoiser", or "latent_denoiser" embedding the latent teacher's autoencoder."""
    if autoencoder is None:
        checkpoint.save(path, den, kind="denoiser", config=config, step=step)
    else:
        checkpoint.save(path, (den, autoencoder), kind="latent_denoiser", config=config, step=step)


def read_rows(path: Path) -> list[dict]:
    """The rows of a students.json (one JSON object per line); none when it does not exist."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def teacher_probe(
    out_dir: Path,
    n_steps: int,
    *,
    first_teacher: Path | None,
    continuous_time: bool,
    teacher_step: StepKind,
    target: StepKind,
    n: int,
    seed: int,
) -> dict | None:
    """The probe metrics of the 2N-step teacher of an N-step student: the earlier students.json row when it was
    scored, else the teacher sampled now (round r - 1's student_<2N>steps.eqx, or for the first round
    `first_teacher` with its own step kind). None for an exact-oracle teacher (`first_teacher` None)."""
    for row in read_rows(out_dir / "students.json"):
        if row.get("student_steps") == 2 * n_steps and "molecule_stability" in row:
            return {k: row[k] for k in metrics.SAMPLE_METRICS if k in row}
    earlier = out_dir / f"student_{2 * n_steps}steps.eqx"
    if earlier.is_file():
        den, spec, autoencoder, _ = checkpoint_teacher(earlier, continuous_time=False, latent_ok=True)
        sampler = student_sampler(2 * n_steps, target)
    elif first_teacher is not None:
        den, spec, autoencoder, _ = checkpoint_teacher(first_teacher, continuous_time=continuous_time, latent_ok=True)
        sampler = student_sampler(2 * n_steps, teacher_step)
    else:
        return None
    print(f"probe: the {2 * n_steps}-step teacher, {n} molecules", flush=True)
    return score_sampler(sampler, den, spec, n, seed=seed, autoencoder=autoencoder)


def finish_round(
    out_dir: Path,
    n_steps: int,
    den: AbstractDenoiser,
    spec: ModelSpec,
    autoencoder,
    *,
    header: dict,
    step: int,
    round_index: int,
    target: StepKind,
    probe: int,
    teacher_kw: dict,
    seed: int,
) -> dict:
    """Write round `round_index`'s N-step student and, with `probe` > 0 molecules, score it and its teacher;
    append the row to students.json and return it. `teacher_kw`: `teacher_probe`'s keyword arguments."""
    sampler = student_sampler(n_steps, target)
    path = out_dir / f"student_{n_steps}steps.eqx"
    per_round = {"student_steps": n_steps, "round": round_index, "sampler": to_dict(sampler)}
    header = dict(header, distillation={**header.get("distillation", {}), **per_round})
    save_student(path, den, autoencoder, config=header, step=step)
    row = {"round": round_index, "student_steps": n_steps, "checkpoint": str(path), "step": step}
    if probe:
        teacher = teacher_probe(out_dir, n_steps, n=probe, seed=seed, target=target, **teacher_kw)
        print(f"probe: the {n_steps}-step student, {probe} molecules", flush=True)
        row |= score_sampler(sampler, den, spec, probe, seed=seed, autoencoder=autoencoder)
        if teacher is not None:
            row["teacher_probe"] = {k: teacher[k] for k in metrics.MATCH_METRICS}
            row["matched_teacher"] = metrics.matches(row, teacher, n=probe)
    shown = {k: v for k, v in row.items() if k not in ("checkpoint", "round", "teacher_probe")}
    print(f"round {round_index}: wrote {path}" + "".join(f"; {k} {v}" for k, v in shown.items()), flush=True)
    with open(out_dir / "students.json", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
