"""tools/convert_edm_checkpoint.py: conversion of the fixture's EDM weights and the parity check."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sde_mol import checkpoint

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_edm_checkpoint.py")
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "edm_parity_small.npz")


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


def test_torch_input_needs_torch(tool, tmp_path):
    try:
        import torch  # noqa: F401
    except ImportError:
        path = tmp_path / "model.pt"
        path.write_bytes(b"not really")
        with pytest.raises(SystemExit, match="needs PyTorch"):
            tool.main(tool.Config(input=path, output=tmp_path / "out.eqx"))
    else:
        pytest.skip("torch is installed")
