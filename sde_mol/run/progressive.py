"""What recipes/progressive_distill.py does at the end of each halving: write the student (the next round's
teacher) and, when asked, score it and its teacher on one fixed probe of molecules.

The probe. Round r's student (N steps) and its teacher (2N steps: the first teacher for r = 0, else round
r - 1's student, read back from its file or from students.json) are sampled with the same seed and scored with
EDM's metrics; `metrics.matches` says whether the student is within two standard errors of its teacher on
atom stability, molecule stability and validity. Every round trains its fixed budget (`--steps-per-round`);
the row says whether the student matched at the end of it. An exact-oracle teacher has no probe of its own.

Trajectory states (`round_batches`). A student trained only at noised data states z_t = alpha x + sigma eps is
used at the states of its teacher's sampling chain, and an imperfect teacher's chain leaves those states (measured
on the QM9 teacher: experiments/NOTES.md). With a trajectory fraction f > 0, that share of a round's training
batches holds states of the round's teacher's own chain from the prior instead (`ProgressiveDistillation.
teacher_trajectory`, as `LevelledState`s). One chain of 2N teacher steps gives N states per molecule; each
generated batch of chains feeds `reuse` training batches (every row at a different level each time, levels
uniform as for data rows), so the chains cost 2N / reuse teacher evaluations per row against two for the
targets. The sizes (masks) of a generated batch are those of the data batch its first slot replaces, and its
key is a function of the round and its index: a resumed run sees the same batches as an uninterrupted one.
"""

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from .. import checkpoint, metrics
from ..denoisers import AbstractDenoiser
from ..host_memory import release_freed_memory
from ..objectives.progressive import LevelledState, ProgressiveDistillation
from ..sde import AbstractSDE
from .configs import GuideConfig, ModelSpec, SamplerConfig, to_dict
from .load import with_guide
from .recipe import checkpoint_teacher, score_sampler

ETA = {"ddim": 0.0, "ddpm": 1.0, "ddpm_mean": 1.0}
"""The DDIM eta of each step kind: deterministic DDIM (Salimans & Ho), the stochastic DDPM step, or (as a teacher
step only) the DDPM step's mean (`ProgressiveDistillation(teacher_noise=False)`; sampled, it is the DDPM step)."""

StepKind = Literal["ddim", "ddpm", "ddpm_mean"]


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
    guide: GuideConfig = GuideConfig(),
    target: StepKind,
    n: int,
    seed: int,
) -> dict | None:
    """The probe metrics of the 2N-step teacher of an N-step student: the earlier students.json row when it was
    scored, else the teacher sampled now (round r - 1's student_<2N>steps.eqx, or for the first round
    `first_teacher` with its own step kind and `guide`). None for an exact-oracle teacher (`first_teacher` None)."""
    for row in read_rows(out_dir / "students.json"):
        if row.get("student_steps") == 2 * n_steps and "molecule_stability" in row:
            return {k: row[k] for k in metrics.SAMPLE_METRICS if k in row}
    earlier = out_dir / f"student_{2 * n_steps}steps.eqx"
    if earlier.is_file():
        den, spec, autoencoder, _ = checkpoint_teacher(earlier, continuous_time=False, latent_ok=True)
        sampler = student_sampler(2 * n_steps, target)
    elif first_teacher is not None:
        den, spec, autoencoder, _ = checkpoint_teacher(first_teacher, continuous_time=continuous_time, latent_ok=True)
        den = with_guide(den, spec, guide, continuous_time=continuous_time)
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
    # Drop every compiled program. Each round compiles its own training step, chains and probe samplers (their
    # step counts are static), and a process may hold at most vm.max_map_count memory mappings (65,530 by default
    # on Linux), about three per compiled kernel. Measured on the 5 x 128 QM9 model: two probes took a run from
    # 14,032 to 23,341 mappings, and clearing the caches took a process from 7,171 back to 816 (two 4-round runs
    # died compiling round 2's probe: experiments/NOTES.md). The next round compiles its step anew either way.
    # Then the freed buffers go back to the OS (kept by `host_memory.keep_freed_memory` otherwise).
    jax.clear_caches()
    release_freed_memory()
    return row


# --- trajectory states ------------------------------------------------------------------------------------


@eqx.filter_jit
def _trajectory_rows(objective: ProgressiveDistillation, teacher, masks, key, n: int, n_feat: int, reuse: int):
    """Chains of the 2n-step teacher for each row of `masks`; for each row `reuse` distinct levels, uniformly:
    (states with axes (batch, reuse, ...), their levels (batch, reuse))."""
    k_levels, k_rows = jr.split(key)
    rows = masks.shape[0]

    def chain(mask, k):
        return objective.teacher_trajectory(teacher, n, mask, n_feat, key=k)

    states = jax.vmap(chain)(masks, jr.split(k_rows, rows))  # (batch, n, ...): entry k is level n - k
    order = jnp.argsort(jr.uniform(k_levels, (rows, n)), axis=1)[:, :reuse]

    def pick(a):
        return jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)

    return jax.tree.map(pick, states), n - order


@dataclass(frozen=True)
class TrajectoryConfig:
    """Training states from the teachers' own sampling chains (module docstring, "Trajectory states")."""

    fraction: float = 0.0
    """share of a round's training batches that hold states of the round's teacher's own sampling chains from the
    prior instead of noised data; 0 = noised data only (Salimans & Ho)"""
    reuse: int = 8
    """training batches fed by one generated batch of chains (each row at another level each time)"""


def copied(tree):
    """`tree` with every array copied: a module that must outlive a training step which donates its buffers."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def round_batches(
    data: Callable[[int], Iterator],
    objective: ProgressiveDistillation,
    teacher: AbstractDenoiser,
    cfg: TrajectoryConfig,
    *,
    n_steps: int,
    round_start: int,
    n_feat: int,
    seed: int,
) -> Callable[[int], Iterator]:
    """The batches of the round that starts at global step `round_start` and trains an `n_steps`-step student
    of `teacher` (2 n_steps steps): `data(start)`'s host batches, with the share `cfg.fraction` of the steps (exactly:
    local step k is one when floor((k + 1) f) > floor(k f)) given instead states of the teacher's chains, as the
    step's device arguments (LevelledState, masks, weights). Module docstring: "Trajectory states". The teacher
    is copied: the training step donates the state's buffers, the round's teacher (its target model) among them."""
    if not 0.0 <= cfg.fraction <= 1.0 or cfg.reuse < 1:
        raise ValueError(
            f"--trajectory.fraction {cfg.fraction} must be in [0, 1] and --trajectory.reuse {cfg.reuse} >= 1"
        )
    if cfg.fraction == 0.0:
        return data
    teacher = copied(teacher)
    f, per_chain = Fraction(cfg.fraction).limit_denominator(1000), min(cfg.reuse, n_steps)
    base = jr.fold_in(jr.PRNGKey(seed), round_start)

    def first_slot(index: int) -> int:  # the local step of trajectory batch `index`
        return math.ceil((index + 1) / f) - 1

    def batches(start: int) -> Iterator:
        if start < round_start:
            raise ValueError(f"round_batches: step {start} is before the round's start {round_start}")
        cache: dict = {}
        for k, batch in enumerate(data(start), start - round_start):
            if math.floor((k + 1) * f) == math.floor(k * f):
                yield batch
                continue
            g, j = divmod(math.floor(k * f), per_chain)
            if cache.get("g") != g:
                first = first_slot(g * per_chain)
                source = batch if first == k else next(iter(data(round_start + first)))
                masks, weights = jnp.asarray(source.mask), jnp.asarray(source.weight)
                z, levels = _trajectory_rows(objective, teacher, masks, jr.fold_in(base, g), n_steps, n_feat, per_chain)
                cache = {"g": g, "z": z, "levels": levels, "masks": masks, "weights": weights}
            z = jax.tree.map(lambda a, j=j: a[:, j], cache["z"])
            yield LevelledState(z, cache["levels"][:, j]), cache["masks"], cache["weights"]

    return batches
