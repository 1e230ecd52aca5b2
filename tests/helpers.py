"""Helpers shared by several test modules (pytest puts tests/ on sys.path: `from helpers import ...`)."""

import importlib.util
import sys
from pathlib import Path

import equinox as eqx
import jax

ROOT = Path(__file__).resolve().parent.parent


def _load_script(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str):
    """Import recipes/<name>.py as a module (recipes are scripts, not a package)."""
    return _load_script(ROOT / "recipes" / f"{name}.py", f"recipe_{name}")


def load_tool(name: str):
    """Import tools/<name>.py as a module."""
    return _load_script(ROOT / "tools" / f"{name}.py", f"tool_{name}")


class SiLU(eqx.Module):
    """A leafless activation: training steps stop-gradient whole models, which fails on raw function leaves."""

    def __call__(self, x):
        return jax.nn.silu(x)


class Identity(eqx.Module):
    def __call__(self, x):
        return x
