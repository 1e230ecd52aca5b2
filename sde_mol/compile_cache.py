"""JAX's persistent compilation cache, on by default for the recipes.

Every recipe compiles the same programs (same shapes) on every run; with the cache, a second run loads them from
disk instead of compiling. The cache lives in `$SDE_MOL_COMPILE_CACHE` if set, else `<sde_mol cache>/xla`
(`$SDE_MOL_CACHE`, default `~/.cache/sde_mol`); setting `SDE_MOL_COMPILE_CACHE=off` (or a recipe's
`--no-compile-cache`) leaves it off. Entries are keyed by the program, the jax version and the backend, so a
stale entry is never used.
"""

import os
from pathlib import Path

import jax

from .data.qm9 import cache_dir

_OFF = ("0", "off", "false", "no")


def compile_cache_dir() -> Path | None:
    """Where the cache goes, or None when `SDE_MOL_COMPILE_CACHE` switches it off."""
    value = os.environ.get("SDE_MOL_COMPILE_CACHE", "")
    if value.lower() in _OFF:
        return None
    return Path(value) if value else cache_dir() / "xla"


def enable_compile_cache(enabled: bool = True) -> Path | None:
    """Point JAX's persistent compilation cache at `compile_cache_dir()` (every program, however fast it
    compiled) and return the folder; with `enabled=False` or the environment switch, do nothing (None)."""
    path = compile_cache_dir() if enabled else None
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
