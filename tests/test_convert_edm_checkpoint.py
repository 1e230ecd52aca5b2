"""tools/convert_edm_checkpoint.py: conversion of the fixture's EDM weights and the parity check."""

import argparse
import importlib.util
import json
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import write_torch_zip

from sde_mol import checkpoint, metrics
from sde_mol.cli import USER_ERRORS
from sde_mol.run.build import build_sampler, continuous_teacher, dataset_info
from sde_mol.run.configs import SamplerConfig
from sde_mol.run.load import load_denoiser
from sde_mol.samplers import sample_molecules

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_edm_checkpoint.py")
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "edm_parity_small.npz")
TEACHER = Path(__file__).resolve().parents[2] / "shared" / "teachers" / "edm_qm9_5l128_t200"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_edm_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_fixture_and_reload(tool, tmp_path, fixture_npz, capsys):
    out = tmp_path / "edm_small.eqx"
    assert tool.main(tool.Config(input=tool.Path(FIXTURE), output=out)) == 0
    assert os.listdir(tmp_path) == ["edm_small.eqx"]
    header = checkpoint.read_header(out)
    assert header["kind"] == "denoiser"
    config = header["config"]
    assert config["egnn"]["n_feat"] == 6 and config["egnn"]["hidden"] == 32 and config["egnn"]["n_layers"] == 3
    assert config["spec"]["sde"] == {"name": "vp_discrete", "timesteps": 1000, "precision": 1e-5, "power": 2.0}
    assert config["spec"]["denoiser"] == {"parametrisation": "eps"} and config["spec"]["dataset"] == "qm9"
    assert "n_feat" not in config["spec"]["model"]

    denoiser = checkpoint.load_with(out, tool.denoiser_skeleton, kind="denoiser")
    np.testing.assert_array_equal(denoiser.sde.gamma_table, fixture_npz["param/gamma.gamma"])
    xh = jnp.asarray(fixture_npz["phi_in_xh"])
    mask = jnp.asarray(fixture_npz["node_mask"][..., 0] > 0)
    with jax.default_matmul_precision("highest"):
        dx, h = jax.jit(jax.vmap(denoiser.net))(xh[..., :3], xh[..., 3:], mask, jnp.asarray(fixture_npz["phi_in_t"]))
    err = np.max(np.abs(np.concatenate([dx, h], -1) - fixture_npz["phi_out"]))
    assert err < 1e-5


def test_check_passes(tool, capsys):
    assert tool.main(tool.Config(check=tool.Path(FIXTURE))) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"]
    network = {"phi_out", "phi_out_f64", "loss_net_out", "nll_net_out_t", "nll_net_out_0", "l0_net_out"}
    sampler = {"anc_eps_hat", "dec_eps_hat", "anc_zs", "dec_x", "dec_one_hot", "dec_charges"}
    schedule = {"gamma", "sched_alpha", "sched_sigma"}
    losses = {"loss_l2_total_per_mol", "loss_l2_batch", "nll_per_mol", "nll_batch"}
    assert network | sampler | schedule | losses == set(report["checks"])
    for name, check in report["checks"].items():
        assert check["max_abs_error"] <= check["tolerance"], name
    assert report["checks"]["phi_out_f64"]["tolerance"] == 1e-9
    assert report["checks"]["phi_out_f64"]["max_abs_error"] < 1e-12


def test_check_fails_on_a_wrong_reference(tool, tmp_path, fixture_npz):
    bad = dict(fixture_npz)
    bad["loss_net_out"] = bad["loss_net_out"] + np.float32(1e-3)
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    ok, report = tool.run_checks(path, checks=(tool.check_network,))
    assert not ok
    assert not report["loss_net_out"]["ok"] and report["phi_out"]["ok"]


def _fixture_run_folder(tmp_path, fixture_npz, **overrides):
    """The fixture's EDM weights as an EDM run folder: a torch.save zip (written without torch) + args.pickle."""
    settings = json.loads(str(fixture_npz["config_json"]))
    folder = tmp_path / "edm_run"
    folder.mkdir()
    params = {k[len("param/") :]: v for k, v in fixture_npz.items() if k.startswith("param/")}
    write_torch_zip(folder / "generative_model_ema.npy", params, root="generative_model_ema")
    keys = ["model", "probabilistic_model", "diffusion_steps", "diffusion_noise_schedule", "diffusion_noise_precision"]
    keys += ["nf", "n_layers", "inv_sublayers", "attention", "tanh", "norm_constant", "normalization_factor"]
    keys += ["aggregation_method", "condition_time", "include_charges", "normalize_factors", "context_node_nf"]
    args = {k: settings[k] for k in keys if k in settings}
    args.update(dataset="qm9", remove_h=False, probabilistic_model="diffusion", ema_decay=0.999)
    args.update(overrides)
    (folder / "args.pickle").write_bytes(pickle.dumps(argparse.Namespace(**args)))
    return folder


def test_edm_run_folder_converts_without_torch_like_the_npz(tool, tmp_path, fixture_npz):
    folder = _fixture_run_folder(tmp_path, fixture_npz)
    from_folder, from_npz = tmp_path / "folder.eqx", tmp_path / "npz.eqx"
    assert tool.main(tool.Config(input=folder, output=from_folder)) == 0
    assert tool.main(tool.Config(input=tool.Path(FIXTURE), output=from_npz)) == 0
    header = checkpoint.read_header(from_folder)["config"]
    assert header["egnn"] == checkpoint.read_header(from_npz)["config"]["egnn"]
    assert header["egnn"]["hidden"] == 32 and header["egnn"]["n_layers"] == 3  # from args.pickle, not the flags
    assert header["spec"]["sde"]["timesteps"] == 1000
    assert header["source"]["file"] == "generative_model_ema.npy + args.pickle"
    assert header["edm_settings"]["ema_decay"] == 0.999
    a = checkpoint.load_with(from_folder, tool.denoiser_skeleton, kind="denoiser")
    b = checkpoint.load_with(from_npz, tool.denoiser_skeleton, kind="denoiser")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # the weights file alone: args.pickle beside it is found
    assert tool.main(tool.Config(input=folder / "generative_model_ema.npy", output=tmp_path / "file.eqx")) == 0
    assert checkpoint.read_header(tmp_path / "file.eqx")["config"]["egnn"]["hidden"] == 32


@pytest.mark.parametrize(
    "override, message",
    [
        ({"remove_h": True}, r"args\.pickle: remove_h = True; the converter supports remove_h = False only"),
        ({"include_charges": False}, r"args\.pickle: include_charges = False"),
        ({"diffusion_noise_schedule": "cosine"}, r"args\.pickle: diffusion_noise_schedule = 'cosine'"),
        ({"normalize_factors": [1, 4, 1]}, r"args\.pickle: normalize_factors = \[1, 4, 1\]"),
        ({"sin_embedding": True}, r"args\.pickle: sin_embedding = True"),
        ({"conditioning": ["alpha"]}, r"args\.pickle: conditioning = \['alpha'\]"),
        ({"dataset": "geom"}, r"args\.pickle: dataset = 'geom'; the converter supports QM9 models only"),
    ],
)
def test_unsupported_edm_settings_are_refused(tool, tmp_path, fixture_npz, override, message):
    folder = _fixture_run_folder(tmp_path, fixture_npz, **override)
    with pytest.raises(USER_ERRORS, match=message):
        tool.main(tool.Config(input=folder, output=tmp_path / "out.eqx"))
    assert not (tmp_path / "out.eqx").exists()


def test_bad_inputs_name_the_file(tool, tmp_path):
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not a zip archive at all")
    with pytest.raises(USER_ERRORS, match=r"garbage\.npy: not a readable zip archive"):
        tool.main(tool.Config(input=garbage, output=tmp_path / "out.eqx"))
    eqx_file = tmp_path / "model.eqx"
    eqx_file.write_bytes(b"{}\n")
    with pytest.raises(USER_ERRORS, match=r"model\.eqx: an sde_mol checkpoint, not EDM weights"):
        tool.main(tool.Config(input=eqx_file, output=tmp_path / "out.eqx"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(USER_ERRORS, match=r"empty_run: an EDM run folder holds one of generative_model_ema.npy"):
        tool.main(tool.Config(input=empty, output=tmp_path / "out.eqx"))
    assert not (tmp_path / "out.eqx").exists()


@pytest.mark.skipif(not TEACHER.is_dir(), reason="../shared/teachers/edm_qm9_5l128_t200 is not present")
def test_shared_teacher_converts_and_samples(tool, tmp_path):
    out = tmp_path / "teacher.eqx"
    assert tool.main(tool.Config(input=TEACHER, output=out)) == 0
    den, spec, header = load_denoiser(out)
    assert (spec.model.hidden, spec.model.n_layers, spec.sde.timesteps) == (128, 5, 200)
    assert header["config"]["edm_settings"]["current_epoch"] == 341
    info = dataset_info("qm9")
    # EDM's ancestral sampler at the model's own T = 200
    sampler = build_sampler(SamplerConfig(sampler="ancestral", steps=200), den, info.n_feat)
    res = sample_molecules(sampler, 12, info, key=jr.PRNGKey(0), batch_size=12, buckets=(29,))
    assert np.all(np.isfinite(res.positions))
    m = metrics.evaluate(res.positions, res.atom_types)
    assert m["atom_stability"] > 0.6, m  # 82 % on 1000 molecules; an untrained or mis-converted net gives < 0.3
    # its continuous twin (the same network on EDM's continuous polynomial schedule) integrates too
    twin, twin_spec = continuous_teacher(den, spec)
    assert twin_spec.sde.name == "vp_polynomial"
    sampler = build_sampler(SamplerConfig(sampler="pf_ode", steps=20, grid="karras"), twin, info.n_feat)
    res = sample_molecules(sampler, 12, info, key=jr.PRNGKey(1), batch_size=12, buckets=(29,))
    assert np.all(np.isfinite(res.positions))
    assert metrics.evaluate(res.positions, res.atom_types)["atom_stability"] > 0.5
