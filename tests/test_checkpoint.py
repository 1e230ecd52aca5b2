import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from sde_mol import __version__, checkpoint
from sde_mol.checkpoint import CheckpointError
from sde_mol.nn import EGNN

CONFIG = dict(n_feat=6, hidden=16, n_layers=2)  # the shapes test_egnn.py compiles too


def _build(config):
    return EGNN(**config, key=jr.key(0))


@pytest.fixture(scope="module")
def model():
    return EGNN(**CONFIG, key=jr.key(7))


@pytest.fixture
def saved(tmp_path, model):
    path = tmp_path / "model.eqx"
    checkpoint.save(path, model, kind="denoiser", config=CONFIG, step=42)
    return path


def _assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(eqx.filter(a, eqx.is_array))
    lb, tb = jax.tree_util.tree_flatten(eqx.filter(b, eqx.is_array))
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_round_trip(saved, model):
    other = EGNN(**CONFIG, key=jr.key(1))
    _assert_trees_equal(checkpoint.load(saved, other), model)
    _assert_trees_equal(checkpoint.load(saved, eqx.filter_eval_shape(_build, CONFIG), kind="denoiser"), model)
    _assert_trees_equal(checkpoint.load_with(saved, _build), model)


def test_round_trip_mixed_tree(tmp_path):
    tree = {"step": jnp.asarray(3), "w": jnp.arange(6.0).reshape(2, 3), "np": np.ones(4, np.int16), "lr": 0.5}
    path = tmp_path / "state.eqx"
    checkpoint.save(path, tree, kind="train_state", config={}, step=3)
    out = checkpoint.load(path, tree, kind="train_state")
    np.testing.assert_array_equal(out["w"], tree["w"])
    assert out["np"].dtype == np.int16 and out["lr"] == 0.5 and int(out["step"]) == 3


def test_header(saved):
    header = checkpoint.read_header(saved)
    assert header["format"] == "sde_mol.checkpoint"
    assert header["format_version"] == 1
    assert header["kind"] == "denoiser"
    assert header["sde_mol_version"] == __version__
    assert header["step"] == 42
    assert header["config"] == CONFIG
    assert header["payload_bytes"] == os.path.getsize(saved) - len(saved.read_bytes().split(b"\n", 1)[0]) - 1
    # the header is one JSON line
    first = saved.read_bytes().split(b"\n", 1)[0]
    assert json.loads(first) == header


def test_atomic_write_leaves_no_temp_files(saved):
    assert sorted(os.listdir(saved.parent)) == ["model.eqx"]


def test_failed_serialisation_keeps_existing_file(saved, model):
    before = saved.read_bytes()
    bad = {"w": np.array([object()], dtype=object)}  # cannot be written without pickle
    with pytest.raises(CheckpointError, match="model.eqx: cannot serialise.*pickle"):
        checkpoint.save(saved, bad, kind="denoiser", config=CONFIG)
    assert saved.read_bytes() == before
    assert sorted(os.listdir(saved.parent)) == ["model.eqx"]


def test_failed_write_keeps_existing_file(saved, model, monkeypatch):
    before = saved.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(checkpoint.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        checkpoint.save(saved, model, kind="denoiser", config=CONFIG, step=1)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert sorted(os.listdir(saved.parent)) == ["model.eqx"]


def test_truncated_file(saved, model):
    data = saved.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 20):
        saved.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="model.eqx.*truncated"):
            checkpoint.load(saved, model)


def test_foreign_files(tmp_path, model):
    cases = {
        "empty.eqx": b"",
        "binary.eqx": bytes(range(256)) * 4,
        "text.eqx": b"hello world\nmore\n",
        "list.eqx": b"[1, 2, 3]\n",
    }
    plain = tmp_path / "plain.eqx"
    eqx.tree_serialise_leaves(plain, model)  # an equinox file without our header
    cases["plain.eqx"] = plain.read_bytes()
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            checkpoint.read_header(path)
        with pytest.raises(CheckpointError, match=name):
            checkpoint.load(path, model)


def _rewrite_header(path, **changes):
    first, rest = path.read_bytes().split(b"\n", 1)
    header = json.loads(first)
    header.update(changes)
    path.write_bytes(json.dumps(header).encode() + b"\n" + rest)


def test_wrong_format_name(saved, model):
    _rewrite_header(saved, format="other.checkpoint")
    with pytest.raises(CheckpointError, match="expected format 'sde_mol.checkpoint'"):
        checkpoint.load(saved, model)


def test_unsupported_format_version(saved, model):
    _rewrite_header(saved, format_version=2)
    with pytest.raises(CheckpointError, match="unsupported format_version 2"):
        checkpoint.read_header(saved)


def test_wrong_kind(saved, model):
    with pytest.raises(CheckpointError, match="expected a checkpoint of kind 'train_state', found 'denoiser'"):
        checkpoint.load(saved, model, kind="train_state")
    with pytest.raises(CheckpointError, match="kind 'train_state'"):
        checkpoint.load_with(saved, _build, kind="train_state")


def test_corrupted_payload(saved, model):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(saved, model)


def test_shape_and_structure_mismatch(saved):
    like = eqx.filter_eval_shape(_build, CONFIG)
    with pytest.raises(CheckpointError, match="model.eqx.*changed shape from"):
        checkpoint.load(saved, eqx.filter_eval_shape(_build, dict(CONFIG, hidden=8)))
    with pytest.raises(CheckpointError, match="model.eqx.*fit the expected skeleton"):  # file has fewer leaves
        checkpoint.load(saved, (like, jax.ShapeDtypeStruct((3,), jnp.float32)))
    with pytest.raises(CheckpointError, match="model.eqx.*more leaves"):  # file has more leaves
        checkpoint.load(saved, (like.embedding.weight, like.embedding.bias))
    with pytest.raises(CheckpointError, match="model.eqx.*dtype"):
        as_int = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.int32), like)
        checkpoint.load(saved, as_int)


def test_config_must_be_json(tmp_path, model):
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path / "x.eqx", model, kind="denoiser", config={"f": object()})
    assert os.listdir(tmp_path) == []


def test_a_non_finite_weight_is_refused_at_load_with_its_leaf_path(tmp_path, model):
    bad = eqx.tree_at(
        lambda m: m.blocks.equiv.coord_mlp_2.weight, model, replace_fn=lambda w: w.at[1, 3, 5].set(jnp.nan)
    )
    path = tmp_path / "nan.eqx"
    checkpoint.save(path, bad, kind="denoiser", config=CONFIG, step=1)
    with pytest.raises(
        CheckpointError, match=r"nan\.eqx: leaf \.blocks\.equiv\.coord_mlp_2\.weight holds 1 non-finite"
    ):
        checkpoint.load_with(path, _build)
    with pytest.raises(CheckpointError, match="non-finite"):
        checkpoint.load(path, model)
    inspected = checkpoint.load_with(path, _build, allow_nonfinite=True)  # a diverged state can still be inspected
    assert np.isnan(inspected.blocks.equiv.coord_mlp_2.weight[1, 3, 5])
