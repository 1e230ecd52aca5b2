"""sde_mol/compile_cache.py: the persistent compilation cache is written where it is told, and can be off."""

import jax
import jax.numpy as jnp
import pytest

from sde_mol.compile_cache import compile_cache_dir, enable_compile_cache


@pytest.fixture
def restore_jax_cache_config():
    yield
    jax.config.update("jax_compilation_cache_dir", None)


def test_compiled_programs_land_in_the_cache_folder(tmp_path, monkeypatch, restore_jax_cache_config):
    monkeypatch.setenv("SDE_MOL_COMPILE_CACHE", str(tmp_path / "xla"))
    assert enable_compile_cache() == tmp_path / "xla"
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.25)(jnp.arange(7.0)).block_until_ready()
    assert any((tmp_path / "xla").iterdir())


def test_the_cache_can_be_switched_off(tmp_path, monkeypatch, restore_jax_cache_config):
    monkeypatch.setenv("SDE_MOL_COMPILE_CACHE", "off")
    assert compile_cache_dir() is None and enable_compile_cache() is None
    monkeypatch.setenv("SDE_MOL_COMPILE_CACHE", str(tmp_path / "xla"))
    assert enable_compile_cache(enabled=False) is None  # a recipe's --no-compile-cache
    assert not (tmp_path / "xla").exists()
    monkeypatch.delenv("SDE_MOL_COMPILE_CACHE")
    monkeypatch.setenv("SDE_MOL_CACHE", str(tmp_path / "c"))
    assert compile_cache_dir() == tmp_path / "c" / "xla"
