"""Convert an EDM (PyTorch reference) QM9 model into an sde_mol checkpoint, and check network parity.

Usage:
    # an EDM run folder: generative_model_ema.npy (a torch.save archive) + args.pickle; torch is NOT needed
    python tools/convert_edm_checkpoint.py --input ../shared/teachers/edm_qm9_5l128_t200 --output edm_qm9.eqx
    python tools/convert_edm_checkpoint.py --input outputs/edm_qm9/generative_model_ema.npy --output edm_qm9.eqx
    # a state dict without args.pickle beside it: give the network's settings as flags
    python tools/convert_edm_checkpoint.py --input sd.pt --nf 192 --n-layers 9 --output small.eqx
    # cross-check our reader against torch.load (needs torch)
    python tools/convert_edm_checkpoint.py --input run_folder --output x.eqx --check-with-torch
    # an npz with `param/<state-dict key>` arrays and an optional `config_json` (like the parity fixture)
    python tools/convert_edm_checkpoint.py --input tests/data/edm_parity_small.npz --output fixture.eqx
    # recompute the fixture's stored network outputs; prints max abs errors as JSON, exit status 1 if any
    # error exceeds its tolerance (1e-5 float32, 1e-9 float64)
    python tools/convert_edm_checkpoint.py --check tests/data/edm_parity_small.npz

The torch archive and args.pickle are read by restricted unpicklers (sde_mol/nn/torch_format.py): only the
globals a state dict or a Namespace needs are resolved, anything else is refused and no pickled code runs.
Settings come from args.pickle (nf, n_layers, inv_sublayers, attention, tanh, norm_constant,
normalization_factor, aggregation_method, condition_time, diffusion_steps, the polynomial_<p> schedule and its
precision); what this converter cannot represent (remove_h, no charges, other normalize_factors, conditioning,
sin_embedding, a non-QM9 dataset, a non-polynomial schedule) is refused with the file and the setting named.
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

from sde_mol import checkpoint, cli
from sde_mol.cli import UsageError
from sde_mol.data.qm9 import DatasetInfo, qm9_info
from sde_mol.denoisers import EpsDenoiser
from sde_mol.likelihood import vlb_terms
from sde_mol.molecule import Molecule
from sde_mol.nn.convert import egnn_config_from_edm, egnn_from_state_dict
from sde_mol.nn.egnn import EGNN
from sde_mol.nn.torch_format import read_namespace, read_state_dict
from sde_mol.objectives.denoising import EDMEpsLoss
from sde_mol.samplers import ancestral_step, decode, edm_final_decode
from sde_mol.sde import DiscreteVPSDE

TOL_F32 = 1e-5
TOL_F64 = 1e-9
TOL_ELEMENT = 1e-5  # per-element state arrays (z_s, decoded positions), absolute
TOL_SCALAR = 2e-5  # per-molecule loss / NLL values, relative to (|value| + 1)
T_STEPS = 1000  # EDM's diffusion_steps for QM9; network time is t_int / T
WEIGHT_FILES = ("generative_model_ema.npy", "generative_model.npy")  # an EDM run folder's weights, EMA first


@dataclass(frozen=True)
class Config:
    input: Path | None = None
    """EDM weights: an EDM run folder (generative_model_ema.npy + args.pickle), a torch.save state dict file
    (read without torch; settings from the args.pickle beside it, else the flags below), or an npz with
    `param/<key>` arrays and `config_json`"""
    output: Path | None = None
    """where to write the sde_mol checkpoint (.eqx)"""
    check: Path | None = None
    """a parity fixture npz: rebuild its network and compare the stored outputs"""
    nf: int = 256
    """hidden width (torch input without args.pickle only; args.pickle / an npz's config_json take precedence)"""
    n_layers: int = 9
    """equivariant blocks (torch input only; an npz's config_json takes precedence)"""
    inv_sublayers: int = 1
    """GCLs per block (torch input only)"""
    aggregation: Literal["sum", "mean"] = "sum"
    """message aggregation (torch input only; the released model's args lack it, EDM then uses sum)"""
    normalization_factor: float = 1.0
    """message normaliser (torch input only)"""
    check_with_torch: bool = False
    """also load the torch file with PyTorch (if installed) and require identical tensors"""


# --- reading EDM weights -----------------------------------------------------------------------------------


def read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """State dict and EDM settings from an npz: `param/<key>` arrays (or bare keys) and `config_json`."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    settings = json.loads(str(arrays.pop("config_json"))) if "config_json" in arrays else {}
    params = {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}
    return (params or arrays), settings


def read_torch(path: Path) -> dict[str, np.ndarray]:
    """A `torch.save` state dict, read without torch (restricted unpickler; see sde_mol/nn/torch_format.py)."""
    if path.suffix == ".eqx":
        raise UsageError(f"{path}: an sde_mol checkpoint, not EDM weights (expected a torch.save file or an npz)")
    return read_state_dict(path)


def torch_cross_check(path: Path, params: dict[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference per tensor between our reader and `torch.load(weights_only=True)` (needs torch)."""
    try:
        import torch
    except ImportError as e:
        raise UsageError("--check-with-torch needs PyTorch (pip install torch)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if set(state) != set(params):
        raise UsageError(f"{path}: torch reads keys {sorted(set(state) ^ set(params))} differently")
    return {k: float(np.max(np.abs(v.detach().cpu().numpy() - params[k]), initial=0.0)) for k, v in state.items()}


def resolve_input(path: Path) -> tuple[Path, Path | None]:
    """(weights file, args.pickle or None) from an EDM run folder or a weights file (args.pickle beside it)."""
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise UsageError(f"{path}: an EDM run folder holds one of {', '.join(WEIGHT_FILES)}; none found")
        weights = found[0]
    elif path.is_file():
        weights = path
    else:
        raise UsageError(f"--input {path}: no such file or folder")
    args = weights.parent / "args.pickle"
    return weights, (args if args.is_file() else None)


def edm_settings_from_flags(cfg: Config) -> dict:
    return dict(
        nf=cfg.nf,
        n_layers=cfg.n_layers,
        inv_sublayers=cfg.inv_sublayers,
        aggregation_method=cfg.aggregation,
        normalization_factor=cfg.normalization_factor,
    )


def edm_settings_from_args(path: Path) -> dict:
    """EDM's run settings from its args.pickle, checked against what this converter supports."""
    args = read_namespace(path)
    expected = {
        "model": "egnn_dynamics",
        "probabilistic_model": "diffusion",
        "remove_h": False,
        "include_charges": True,
        "context_node_nf": 0,
        "conditioning": [],
        "sin_embedding": False,
    }
    if not str(args.get("dataset", "qm9")).startswith("qm9"):
        raise UsageError(f"{path}: dataset = {args['dataset']!r}; the converter supports QM9 models only")
    for name, value in expected.items():
        if name in args and args[name] != value:
            raise UsageError(f"{path}: {name} = {args[name]!r}; the converter supports {name} = {value!r} only")
    if "normalize_factors" in args and [float(f) for f in args["normalize_factors"]] != [1.0, 4.0, 10.0]:
        raise UsageError(f"{path}: normalize_factors = {args['normalize_factors']}; QM9 here uses [1, 4, 10]")
    schedule = str(args.get("diffusion_noise_schedule", "polynomial_2"))
    if not schedule.startswith("polynomial_"):
        raise UsageError(f"{path}: diffusion_noise_schedule = {schedule!r}; expected polynomial_<power>")
    settings = dict(args)
    settings["noise_power"] = float(schedule[len("polynomial_") :])
    return settings


def header_config(egnn: EGNN, settings: dict, source: str) -> dict:
    """Checkpoint header config: `spec` (configs.ModelSpec as a dict), `egnn` (EGNN kwargs), `source`."""
    egnn_kwargs = egnn.config()
    model = {k: v for k, v in egnn_kwargs.items() if k != "n_feat"}
    sde = {
        "name": "vp_discrete",
        "timesteps": int(settings.get("diffusion_steps", T_STEPS)),
        "precision": float(settings.get("diffusion_noise_precision", 1e-5)),
        "power": float(settings.get("noise_power", 2.0)),
    }
    spec = {"model": model, "sde": sde, "denoiser": {"parametrisation": "eps"}, "dataset": "qm9"}
    return {
        "spec": spec,
        "egnn": egnn_kwargs,
        "source": {"reference": "EDM ehoogeboom/e3_diffusion_for_molecules", "file": source},
        "edm_settings": json.loads(json.dumps(settings, default=str)),
    }


def denoiser_skeleton(config: dict) -> EpsDenoiser:
    """The tree of a converted checkpoint, from its header config (use with `checkpoint.load_with`)."""
    net = EGNN(**config["egnn"], key=jr.key(0))
    sde = config["spec"]["sde"]
    table = jnp.zeros((sde["timesteps"] + 1,), jnp.float32)
    return EpsDenoiser(net, DiscreteVPSDE(table, sde["power"], sde["precision"]))


def convert(params: dict[str, np.ndarray], settings: dict) -> EpsDenoiser:
    """EDM weights -> `EpsDenoiser(EGNN, DiscreteVPSDE)`; the gamma table is the state dict's if present."""
    net = egnn_from_state_dict(params, egnn_config_from_edm(settings))
    steps = int(settings.get("diffusion_steps", T_STEPS))
    power = float(settings.get("noise_power", 2.0))
    precision = float(settings.get("diffusion_noise_precision", 1e-5))
    if "gamma.gamma" in params:
        table = np.asarray(params["gamma.gamma"])
        if table.shape != (steps + 1,):
            raise ValueError(f"gamma.gamma has shape {table.shape}; diffusion_steps = {steps} needs ({steps + 1},)")
        sde = DiscreteVPSDE(table, power, precision)
    else:
        sde = DiscreteVPSDE.edm_polynomial(steps, power, precision)
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


def _fixture_denoiser(fx: Fixture) -> EpsDenoiser:
    params = {k[len("param/") :]: v for k, v in fx.items() if k.startswith("param/")}
    return convert(params, json.loads(str(fx["config_json"])))


def _mols(fx: Fixture, key: str) -> Molecule:
    a = jnp.asarray(fx[key], jnp.float32)
    return Molecule(a[..., :3], a[..., 3:])


def _step_time(t_int) -> jnp.ndarray:
    return jnp.asarray(np.asarray(t_int, np.float32) / np.float32(T_STEPS))


def check_schedule(fx: Fixture) -> dict[str, tuple[float, float]]:
    """The gamma table built from the schedule's definition, and alpha/sigma at the fixture's times."""
    sde = DiscreteVPSDE.edm_polynomial(T_STEPS, 2.0, 1e-5)
    out = {"gamma": (_max_err(sde.gamma_table, fx["gamma"]), 0.0)}
    if "sched_t" in fx:
        alpha, sigma = jax.vmap(sde.marginal)(jnp.asarray(fx["sched_t"]))
        out["sched_alpha"] = (float(np.max(np.abs(np.asarray(alpha) / fx["sched_alpha"] - 1))), 1e-6)
        out["sched_sigma"] = (float(np.max(np.abs(np.asarray(sigma) / fx["sched_sigma"] - 1))), 1e-6)
    return out


def check_sampling(fx: Fixture) -> dict[str, tuple[float, float]]:
    """One ancestral step and the final decode p(x, h | z_0), end to end with the converted network."""
    if "anc_zt" not in fx:
        return {}
    den = _fixture_denoiser(fx)
    mask = jnp.asarray(fx["node_mask"][..., 0] > 0)
    info = DatasetInfo(size_counts=(1,) * 30)
    with jax.default_matmul_precision("highest"):
        zs = jax.vmap(lambda s, t, z, m, n: ancestral_step(den, den.sde, s, t, z, m, n))(
            _step_time(fx["anc_s"]), _step_time(fx["anc_t"]), _mols(fx, "anc_zt"), mask, _mols(fx, "anc_noise")
        )
        dec = jax.vmap(lambda z, m, n: edm_final_decode(den, den.sde, jnp.zeros(()), z, m, n))(
            _mols(fx, "dec_z0"), mask, _mols(fx, "dec_noise")
        )
    positions, types, charges = jax.vmap(lambda z, m: decode(z, m, info))(dec, mask)
    one_hot = np.where(np.asarray(mask)[..., None], np.eye(5)[np.maximum(np.asarray(types), 0)], 0)
    return {
        "anc_zs": (_max_err(zs.to_array(), fx["anc_zs"]), TOL_ELEMENT),
        "dec_x": (_max_err(positions, fx["dec_x"]), TOL_ELEMENT),
        "dec_one_hot": (_max_err(one_hot, fx["dec_one_hot"]), 0.0),
        "dec_charges": (_max_err(charges, fx["dec_charges"][..., 0]), 0.0),
    }


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / (np.abs(b) + 1.0)))


def check_losses(fx: Fixture) -> dict[str, tuple[float, float]]:
    """EDM's training loss (fixed t and noise) and evaluation NLL terms, per molecule."""
    if "loss_t_int" not in fx:
        return {}
    den = _fixture_denoiser(fx)
    settings = json.loads(str(fx["config_json"]))
    info = fixture_info(settings)
    mask = jnp.asarray(fx["node_mask"][..., 0] > 0)
    xh = _mols(fx, "xh_norm")
    objective = EDMEpsLoss(info, timesteps=T_STEPS, n_pad=int(mask.shape[1]))
    with jax.default_matmul_precision("highest"):
        loss = jax.vmap(lambda x, m, t, e: objective.terms(den, x, m, t, e))(
            xh, mask, jnp.asarray(fx["loss_t_int"]), _mols(fx, "loss_eps")
        )
        nll = jax.vmap(lambda x, m, t, e, e0: vlb_terms(den, x, m, info, t, e, e0, timesteps=T_STEPS))(
            xh, mask, jnp.asarray(fx["nll_t_int"]), _mols(fx, "nll_eps"), _mols(fx, "nll_eps0")
        )
    return {
        "loss_l2_total_per_mol": (_rel_err(loss["total"], fx["loss_l2_total_per_mol"]), TOL_SCALAR),
        "loss_l2_batch": (_rel_err(np.mean(loss["total"]), fx["loss_l2_batch"]), TOL_SCALAR),
        "nll_per_mol": (_rel_err(nll["nll"], fx["nll_per_mol"]), TOL_SCALAR),
        "nll_batch": (_rel_err(np.mean(nll["nll"]), fx["nll_batch"]), TOL_SCALAR),
    }


def fixture_info(settings: dict) -> DatasetInfo:
    """DatasetInfo with the fixture's size histogram (config_json), else QM9's."""
    hist = settings.get("n_nodes_histogram")
    if not isinstance(hist, dict):
        return qm9_info()
    counts = [0] * 30
    for m, c in hist.items():
        counts[int(m)] = int(c)
    return DatasetInfo(size_counts=tuple(counts))


CHECKS: tuple[Check, ...] = (check_network, check_schedule, check_sampling, check_losses)


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
        raise UsageError("nothing to do: give --input IN --output OUT.eqx and/or --check FIXTURE.npz")
    status = 0
    if cfg.input is not None:
        if cfg.output is None:
            raise UsageError("--input needs --output OUT.eqx")
        if cfg.input.suffix == ".npz":
            params, settings = read_npz(cfg.input)
            settings = settings or edm_settings_from_flags(cfg)
            source = cfg.input.name
        else:
            weights, args = resolve_input(cfg.input)
            params = read_torch(weights)
            settings = edm_settings_from_args(args) if args is not None else edm_settings_from_flags(cfg)
            source = weights.name if args is None else f"{weights.name} + {args.name}"
            if cfg.check_with_torch:
                diffs = torch_cross_check(weights, params)
                if max(diffs.values(), default=0.0) != 0.0:
                    raise UsageError(f"{weights}: torch reads different values: {diffs}")
                print(json.dumps({"torch_cross_check": "identical", "tensors": len(diffs)}))
        denoiser = convert(params, settings)
        config = header_config(denoiser.net, settings, source)
        checkpoint.save(cfg.output, denoiser, kind="denoiser", config=config, step=0)
        print(json.dumps({"wrote": str(cfg.output), "egnn": config["egnn"]}))
    if cfg.check is not None:
        ok, report = run_checks(cfg.check)
        print(json.dumps({"ok": ok, "checks": report}, indent=1))
        status = 0 if ok else 1
    return status


if __name__ == "__main__":
    sys.exit(cli.run(main, lambda: tyro.cli(Config)))
