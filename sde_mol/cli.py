"""The command-line edge of every recipe and tool: argument checks in one place, user errors as one line.

`run(main, parse)` parses the command line (`parse()`, e.g. `lambda: tyro.cli(Config)`), checks the resulting
config with `check_config` BEFORE any work, and calls `main(cfg)`. A user's mistake (`USER_ERRORS`: a bad flag
value, a missing or malformed file, a checkpoint of the wrong kind) prints one line `error: ...` on stderr and
exits with status 2; `SDE_MOL_DEBUG=1` re-raises it with its traceback. Programming errors keep their traceback.

`check_config` walks a (nested) config dataclass and applies the rule of every field whose name it knows
(`FIELD_RULES`: counts >= 1, steps >= 1, lr finite > 0, eta >= 0, tolerances > 0, ...) plus the cross-field rules
of `CLASS_RULES`, and names the offending flag as tyro spells it (`--sampler.steps`), whatever the recipe.
"""

import dataclasses
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .checkpoint import CheckpointError
from .data.qm9 import QM9FormatError
from .host_memory import keep_freed_memory
from .io import MoleculeFileError
from .nn.torch_format import TorchFormatError

C = TypeVar("C")


class UsageError(ValueError):
    """A user's mistake (a flag value, a file): reported as one line `error: ...`, exit status 2."""


USER_ERRORS = (
    UsageError,
    CheckpointError,
    TorchFormatError,
    QM9FormatError,
    MoleculeFileError,
    FileNotFoundError,
    NotADirectoryError,
)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _at_least(bound: int | float, what: str) -> Callable[[Any], str | None]:
    def rule(v):
        if v is None:
            return None
        values = v if isinstance(v, tuple) else (v,)
        for x in values:
            if not _is_number(x) or not math.isfinite(x) or x < bound:
                return f"expected {what}, got {x!r}"
        return None

    return rule


def _above(bound: int | float, what: str) -> Callable[[Any], str | None]:
    def rule(v):
        if v is None:
            return None
        if not _is_number(v) or not math.isfinite(v) or v <= bound:
            return f"expected {what}, got {v!r}"
        return None

    return rule


def _in_unit_interval(v) -> str | None:
    if not _is_number(v) or not (0.0 <= v < 1.0):
        return f"expected a decay in [0, 1), got {v!r}"
    return None


def _out_dir(v) -> str | None:
    if v is not None and Path(v).exists() and not Path(v).is_dir():
        return f"{v} exists and is not a folder"
    return None


def _output_file(v) -> str | None:
    if v is not None and Path(v).is_dir():
        return f"{v} is a folder; expected a file name"
    return None


def _existing_file(v) -> str | None:
    if v is None or str(v).startswith("oracle:"):
        return None
    path = Path(v)
    if not path.exists():
        return f"{v} does not exist"
    return None


_COUNT = _at_least(1, "an integer >= 1")
_NON_NEGATIVE_INT = _at_least(0, "an integer >= 0")
_POSITIVE = _above(0.0, "a finite number > 0")
_NON_NEGATIVE = _at_least(0.0, "a finite number >= 0")

FIELD_RULES: dict[str, Callable[[Any], str | None]] = {
    # counts and sizes
    "n_samples": _COUNT,
    "batch_size": _COUNT,
    "steps": _COUNT,
    "max_steps": _COUNT,
    "eval_steps": _COUNT,
    "teacher_steps": _COUNT,
    "steps_per_round": _COUNT,
    "rounds": _COUNT,
    "log_every": _COUNT,
    "eval_every": _COUNT,
    "ckpt_every": _COUNT,
    "buckets": _COUNT,
    "hidden": _COUNT,
    "n_layers": _COUNT,
    "nf": _COUNT,
    "inv_sublayers": _COUNT,
    "timesteps": _COUNT,
    "n_points": _at_least(2, "an integer >= 2"),
    "n_valid": _NON_NEGATIVE_INT,
    "eval_samples": _NON_NEGATIVE_INT,
    "warmup_steps": _NON_NEGATIVE_INT,
    "decay_steps": _NON_NEGATIVE_INT,
    "prefetch": _NON_NEGATIVE_INT,
    # optimisation and numerics
    "lr": _POSITIVE,
    "lr_end": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "ema_decay": _in_unit_interval,
    "eta": _NON_NEGATIVE,
    "rtol": _POSITIVE,
    "atol": _POSITIVE,
    "rho": _POSITIVE,
    "sigma_data": _POSITIVE,
    "max_minutes": _POSITIVE,
    "truncation_sigma": _POSITIVE,
    # files and folders
    "out_dir": _out_dir,
    "checkpoint": _existing_file,
    "resume": _existing_file,
    "init_from": _existing_file,
    "teacher": _existing_file,
    "boundary": _existing_file,
    "autoencoder": _existing_file,
    "input": _existing_file,
    "check": _existing_file,
    "output": _output_file,
    "out": _output_file,
}


# where a field means something else in one config class: "ClassName.field" takes precedence
FIELD_RULES["EvalConfig.n_samples"] = _NON_NEGATIVE_INT  # train_edm's evaluation: 0 skips sampling


def _n_train_holds_a_batch(cfg) -> tuple[str, str] | None:
    n, b = getattr(cfg, "n_train", None), getattr(cfg, "batch_size", None)
    if n is not None and _is_number(b) and n < b:
        return "n_train", f"expected at least one batch (--data.batch-size {b}) of molecules, got {n}"
    return None


CLASS_RULES: tuple[Callable[[Any], tuple[str, str] | None], ...] = (_n_train_holds_a_batch,)


def flag(path: tuple[str, ...]) -> str:
    """The tyro flag of a (nested) field: ("sampler", "max_steps") -> --sampler.max-steps."""
    return "--" + ".".join(p.replace("_", "-") for p in path)


def check_config(cfg, _path: tuple[str, ...] = ()) -> None:
    """Raise `UsageError` naming the first flag whose value a rule refuses (walks nested dataclasses)."""
    if not dataclasses.is_dataclass(cfg):
        return
    for rule in CLASS_RULES:
        found = rule(cfg)
        if found is not None:
            name, message = found
            raise UsageError(f"{flag(_path + (name,))}: {message}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, _path + (f.name,))
            continue
        rule = FIELD_RULES.get(f"{type(cfg).__name__}.{f.name}", FIELD_RULES.get(f.name))
        message = rule(value) if rule is not None else None
        if message is not None:
            raise UsageError(f"{flag(_path + (f.name,))}: {message}")


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return " ".join(text.split())


def run(main: Callable[[C], Any], parse: Callable[[], C]) -> Any:
    """Parse, check, run; a user error becomes `error: <one line>` on stderr and exit status 2. First of all,
    before JAX starts its backend, `host_memory.keep_freed_memory()` (XLA's CPU buffers are reused instead of
    faulted in again on every call)."""
    keep_freed_memory()
    try:
        cfg = parse()
        check_config(cfg)
        return main(cfg)
    except USER_ERRORS as e:
        if os.environ.get("SDE_MOL_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
