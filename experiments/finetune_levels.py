"""Where a fine-tune helps or hurts: the eps MSE per noise level of the imported network, and of the EMA and raw
models of a training state, on the same validation molecules with the same noise (a paired comparison).

Usage:
    python experiments/finetune_levels.py --state runs/edm_qm9_finetune/last.eqx
    python experiments/finetune_levels.py --state checkpoints/edm_qm9_finetune.train_state.eqx --n-valid 500

The imported network is run on the training state's SDE (e.g. T = 1000), so the three differ only in weights.
Figures and the runs they compare: experiments/NOTES.md, "Fine-tuning the imported EDM model".
"""

import json
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import tyro

from sde_mol.data.loader import encode_split
from sde_mol.data.qm9 import load_qm9
from sde_mol.molecule import Molecule, com_free_normal
from sde_mol.objectives.denoising import eps_error
from sde_mol.run.build import dataset_info
from sde_mol.run.load import load_denoiser


@dataclass(frozen=True)
class Config:
    state: Path
    """a train_state checkpoint of recipes/train_edm.py"""
    base: Path = Path("checkpoints/edm_qm9_base.eqx")
    """the network the fine-tune started from"""
    levels: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)
    n_valid: int = 1000
    """the first n molecules of the QM9 validation split"""
    seed: int = 7
    chunk: int = 250


def main(cfg: Config) -> dict:
    info = dataset_info("qm9")
    pos, feat, mask = encode_split(load_qm9("valid").subset(slice(0, cfg.n_valid)), info)

    @eqx.filter_jit
    def errors(den, x, m, t, key):
        noise = jax.vmap(lambda k, mm: com_free_normal(k, mm, info.n_feat))(jr.split(key, m.shape[0]), m)
        err, n = jax.vmap(lambda xx, mm, e: eps_error(den, xx, mm, t, e))(x, m, noise)
        return jnp.sum(err), jnp.sum(n)

    def per_level(den) -> np.ndarray:
        out = []
        for t in cfg.levels:
            num = count = 0.0
            for i in range(0, cfg.n_valid, cfg.chunk):
                x = Molecule(jnp.asarray(pos[i : i + cfg.chunk]), jnp.asarray(feat[i : i + cfg.chunk]))
                e, n = errors(
                    den, x, jnp.asarray(mask[i : i + cfg.chunk]), jnp.float32(t), jr.fold_in(jr.key(cfg.seed), i)
                )
                num, count = num + float(e), count + float(n)
            out.append(num / count)
        return np.asarray(out)

    ema, _, _ = load_denoiser(cfg.state, which="ema")
    raw, _, _ = load_denoiser(cfg.state, which="model")
    base = eqx.tree_at(lambda d: d.net, ema, load_denoiser(cfg.base)[0].net)
    res = {name: per_level(den) for name, den in (("import", base), ("ema", ema), ("raw", raw))}
    report = {"levels": list(cfg.levels), **{k: np.round(v, 5).tolist() for k, v in res.items()}}
    report |= {f"{k}/import": np.round(res[k] / res["import"], 4).tolist() for k in ("ema", "raw")}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(tyro.cli(Config))
