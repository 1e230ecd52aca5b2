"""Convert an EDM (PyTorch reference) QM9 model into an sde_mol checkpoint, and check network parity.

Usage:
    # the released EDM model (a torch.save'd state dict; needs `pip install torch`)
    python tools/convert_edm_checkpoint.py --input outputs/edm_qm9/generative_model_ema.npy --output edm_qm9.eqx
    python tools/convert_edm_checkpoint.py --input sd.pt --nf 192 --n-layers 9 --output small.eqx
    # an npz with `param/<state-dict key>` arrays and an optional `config_json` (like the parity fixture)
    python tools/convert_edm_checkpoint.py --input tests/data/edm_parity_small.npz --output fixture.eqx
    # recompute the fixture's stored network outputs; prints max abs errors as JSON, exit status 1 if any
    # error exceeds its tolerance (1e-5 float32, 1e-9 float64)
    python tools/convert_edm_checkpoint.py --check tests/data/edm_parity_small.npz

The output is a `kind="denoiser"` checkpoint holding `EpsDenoiser(EGNN, DiscreteVPSDE)` (the gamma table is the
state dict's `gamma.gamma` when present). Its header config holds `spec` (the `configs.ModelSpec` dict: model,
sde, denoiser, dataset), `egnn` (the EGNN keyword arguments, n_feat included) and `source`.

Parity checks are plain functions `fixture -> {name: (max_abs_error, tolerance)}` listed in `CHECKS`; add a
function there to check more of the fixture (schedule, ancestral step, decode, losses).
"""

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

from sde_mol import checkpoint
from sde_mol.denoisers import EpsDenoiser
from sde_mol.nn.convert import egnn_config_from_edm, egnn_from_state_dict
from sde_mol.nn.egnn import EGNN
from sde_mol.sde import DiscreteVPSDE

TOL_F32 = 1e-5
TOL_F64 = 1e-9
T_STEPS = 1000  # EDM's diffusion_steps for QM9; network time is t_int / T


@dataclass(frozen=True)
class Config:
    input: Path | None = None
    """EDM weights: a PyTorch state dict file (torch.load, weights_only) or an npz with `param/<key>` arrays"""
    output: Path | None = None
    """where to write the sde_mol checkpoint (.eqx)"""
    check: Path | None = None
    """a parity fixture npz: rebuild its network and compare the stored outputs"""
    nf: int = 256
    """hidden width (torch input only; an npz's config_json takes precedence)"""
    n_layers: int = 9
    """equivariant blocks (torch input only; an npz's config_json takes precedence)"""
    inv_sublayers: int = 1
    """GCLs per block (torch input only)"""
    aggregation: Literal["sum", "mean"] = "sum"
    """message aggregation (torch input only; the released model's args lack it, EDM then uses sum)"""
    normalization_factor: float = 1.0
    """message normaliser (torch input only)"""


# --- reading EDM weights -----------------------------------------------------------------------------------


def read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """State dict and EDM settings from an npz: `param/<key>` arrays (or bare keys) and `config_json`."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    settings = json.loads(str(arrays.pop("config_json"))) if "config_json" in arrays else {}
    params = {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}
    return (params or arrays), settings


def read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            f"reading {path} needs PyTorch (pip install torch, or `pip install sde_mol[torch]`); "
            "alternatively convert the state dict to an npz of `param/<key>` arrays elsewhere"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def edm_settings_from_flags(cfg: Config) -> dict:
    return dict(
        nf=cfg.nf,
        n_layers=cfg.n_layers,
        inv_sublayers=cfg.inv_sublayers,
        aggregation_method=cfg.aggregation,
        normalization_factor=cfg.normalization_factor,
    )


def header_config(egnn: EGNN, settings: dict, source: str) -> dict:
    """Checkpoint header config: `spec` (configs.ModelSpec as a dict), `egnn` (EGNN kwargs), `source`."""
    egnn_kwargs = egnn.config()
    model = {k: v for k, v in egnn_kwargs.items() if k != "n_feat"}
    sde = {
        "name": "vp_discrete",
        "timesteps": int(settings.get("diffusion_steps", T_STEPS)),
        "precision": float(settings.get("diffusion_noise_precision", 1e-5)),
        "power": 2.0,
    }
    spec = {"model": model, "sde": sde, "denoiser": {"parametrisation": "eps"}, "dataset": "qm9"}
    return {
        "spec": spec,
        "egnn": egnn_kwargs,
        "source": {"reference": "EDM ehoogeboom/e3_diffusion_for_molecules", "file": source},
    }


def denoiser_skeleton(config: dict) -> EpsDenoiser:
    """The tree of a converted checkpoint, from its header config (use with `checkpoint.load_with`)."""
    net = EGNN(**config["egnn"], key=jr.key(0))
    table = jnp.zeros((config["spec"]["sde"]["timesteps"] + 1,), jnp.float32)
    return EpsDenoiser(net, DiscreteVPSDE(table))


def convert(params: dict[str, np.ndarray], settings: dict) -> EpsDenoiser:
    """EDM weights -> `EpsDenoiser(EGNN, DiscreteVPSDE)`; the gamma table is the state dict's if present."""
    net = egnn_from_state_dict(params, egnn_config_from_edm(settings))
    if "gamma.gamma" in params:
        sde = DiscreteVPSDE(params["gamma.gamma"])
    else:
        steps = int(settings.get("diffusion_steps", T_STEPS))
        precision = float(settings.get("diffusion_noise_precision", 1e-5))
        sde = DiscreteVPSDE.edm_polynomial(steps, 2.0, precision)
    return EpsDenoiser(net, sde)


# --- parity checks -----------------------------------------------------------------------------------------

Fixture = dict[str, np.ndarray]
Check = Callable[[Fixture], dict[str, tuple[float, float]]]


@eqx.filter_jit
def _batched(net, x, h, mask, t):
    return jax.vmap(net)(x, h, mask, t)


def _eps_hat(net: EGNN, xh: np.ndarray, mask: np.ndarray, t: np.ndarray, dtype) -> np.ndarray:
    """EDM's network output vector eps_hat = [dx | h_out] for a batch, shape (B, N, 3 + n_feat)."""
    xh = jnp.asarray(xh, dtype)
    dx, h = _batched(net, xh[..., :3], xh[..., 3:], jnp.asarray(mask), jnp.asarray(t, dtype))
    return np.concatenate([np.asarray(dx), np.asarray(h)], axis=-1)


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _fixture_net(fx: Fixture, dtype) -> EGNN:
    settings = json.loads(str(fx["config_json"]))
    params = {k[len("param/") :]: v for k, v in fx.items() if k.startswith("param/")}
    return egnn_from_state_dict(params, egnn_config_from_edm(settings), dtype=dtype)


def check_network(fx: Fixture) -> dict[str, tuple[float, float]]:
    """Every stored network output of the fixture, recomputed from its inputs and times."""
    mask = fx["node_mask"][..., 0] > 0
    zeros = np.zeros(mask.shape[0], np.float32)

    def step_time(t_int):  # t = t_int / T in float32, as the reference computes it
        return np.asarray(t_int, np.float32) / np.float32(T_STEPS)

    cases = {
        "phi_out": ("phi_in_xh", fx["phi_in_t"]),
        "loss_net_out": ("loss_zt", fx["loss_time"]),
        "nll_net_out_t": ("nll_zt", fx["nll_time"]),
        "nll_net_out_0": ("nll_z0", zeros),
        "l0_net_out": ("l0_z0", zeros),
        "anc_eps_hat": ("anc_zt", step_time(fx["anc_t"])),
        "dec_eps_hat": ("dec_z0", zeros),
    }
    results = {}
    with jax.default_matmul_precision("highest"):
        net = _fixture_net(fx, jnp.float32)
        for name, (inp, t) in cases.items():
            if name in fx and inp in fx:
                out = _eps_hat(net, fx[inp], mask, t, jnp.float32)
                results[name] = (_max_err(out, fx[name]), TOL_F32)
        if "phi_out_f64" in fx:
            with jax.enable_x64(True):
                net64 = _fixture_net(fx, jnp.float64)
                out = _eps_hat(net64, fx["phi_in_xh"], mask, fx["phi_in_t"], jnp.float64)
            results["phi_out_f64"] = (_max_err(out, fx["phi_out_f64"]), TOL_F64)
    return results


CHECKS: tuple[Check, ...] = (check_network,)


def run_checks(fixture_path: Path, checks: tuple[Check, ...] = CHECKS) -> tuple[bool, dict]:
    """Run every check on a fixture; returns (all within tolerance, JSON-ready report)."""
    with np.load(fixture_path, allow_pickle=False) as z:
        fx = {k: z[k] for k in z.files}
    report = {}
    for check in checks:
        for name, (err, tol) in check(fx).items():
            report[name] = {"max_abs_error": err, "tolerance": tol, "ok": bool(err <= tol)}
    ok = bool(report) and all(r["ok"] for r in report.values())
    return ok, report


# --- CLI ---------------------------------------------------------------------------------------------------


def main(cfg: Config) -> int:
    if cfg.input is None and cfg.check is None:
        raise SystemExit("nothing to do: give --input IN --output OUT.eqx and/or --check FIXTURE.npz")
    status = 0
    if cfg.input is not None:
        if cfg.output is None:
            raise SystemExit("--input needs --output OUT.eqx")
        if cfg.input.suffix == ".npz":
            params, settings = read_npz(cfg.input)
            settings = settings or edm_settings_from_flags(cfg)
        else:
            params, settings = read_torch(cfg.input), edm_settings_from_flags(cfg)
        denoiser = convert(params, settings)
        config = header_config(denoiser.net, settings, cfg.input.name)
        checkpoint.save(cfg.output, denoiser, kind="denoiser", config=config, step=0)
        print(json.dumps({"wrote": str(cfg.output), "egnn": config["egnn"]}))
    if cfg.check is not None:
        ok, report = run_checks(cfg.check)
        print(json.dumps({"ok": ok, "checks": report}, indent=1))
        status = 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Config)))
