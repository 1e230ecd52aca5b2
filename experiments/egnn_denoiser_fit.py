"""Can the EGNN learn the DENOISER of the rotation-augmented toy oracle (the data of the slow EGNN consistency
test in tests/test_consistency.py: `data.fixed.toy_oracle` on EDM's VP schedule in continuous time)? Trains
`KarrasDenoiser(EGNN)` with `KarrasLoss` on the first K toy molecules under 32 fixed random rotations and
reflections, and prints one JSON line every --every steps: the median
position RMSD to the clean molecule (same frame, 200 noised samples) of the EGNN's x0, of the exact denoiser's
and of the noisy input itself (the identity), at four noise levels s = sigma / alpha.

A consistency student cannot be better than the denoiser its network can learn, so this is the first check
when the EGNN consistency test fails. Results: experiments/NOTES.md ("EGNN students against the
rotation-augmented oracle"). Usage (~0.1 s per step on a 2-core CPU at hidden 64):
    python experiments/egnn_denoiser_fit.py --molecules 1 --steps 2000
    python experiments/egnn_denoiser_fit.py --molecules 4 --lr 3e-3 --hidden 128
"""

import json
import time
from dataclasses import asdict, dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import tyro

from sde_mol.data.fixed import toy_oracle
from sde_mol.denoisers import KarrasDenoiser
from sde_mol.molecule import Molecule, com_free_normal, project
from sde_mol.nn.egnn import EGNN
from sde_mol.objectives.denoising import KarrasLoss
from sde_mol.oracle import OracleDenoiser, rotation_augmented
from sde_mol.sde import PolynomialVPSDE
from sde_mol.training.state import init_state, make_step

LEVELS = (0.05, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Config:
    molecules: int = 4
    """K: the first K of the toy oracle's molecules (1..4)"""
    rotations: int = 32
    steps: int = 2000
    every: int = 500
    hidden: int = 64
    layers: int = 4
    lr: float = 1e-3
    lr_decay: float = 30.0
    """the learning rate decays exponentially by this factor over the run (Adam, global-norm clip 1)"""
    batch: int = 64
    sigma_data: float = 1.0
    seed: int = 1


@eqx.filter_jit
def _rmsds(model, teacher: OracleDenoiser, s: float, n_real: int, key):
    """(EGNN x0, exact x0, noisy input / alpha) RMSDs over the first `n_real` atoms (the real ones) to the clean
    molecule for 200 draws at level s (a Python float: static, so each level compiles once per run)."""
    sde, mask, n_feat = teacher.sde, teacher.mask, teacher.data.features.shape[-1]
    t = sde.t_from_logsnr(-2.0 * jnp.log(jnp.float32(s)))
    alpha, sigma = sde.marginal(t)

    def one(key):
        k_mol, k_noise = jr.split(key)
        i = jr.randint(k_mol, (), 0, teacher.data.positions.shape[0])
        x = Molecule(teacher.data.positions[i], teacher.data.features[i])
        z = project(alpha * x + sigma * com_free_normal(k_noise, mask, n_feat, jnp.float32), mask)

        def rmsd(y):
            return jnp.sqrt(jnp.sum((y.positions - x.positions)[:n_real] ** 2, -1).mean())

        return rmsd(model(t, z, mask)), rmsd(teacher(t, z, mask)), rmsd(z / alpha)

    return jax.vmap(one)(jr.split(key, 200))


def errors(model, teacher: OracleDenoiser, s: float, key) -> dict[str, float]:
    """Median RMSD to the clean molecule of (EGNN x0, exact x0, noisy input / alpha) at level s."""
    egnn, exact, identity = _rmsds(model, teacher, s, int(teacher.mask.sum()), key)
    return {name: float(np.median(v)) for name, v in (("egnn", egnn), ("exact", exact), ("identity", identity))}


def main(cfg: Config) -> list[dict]:
    toy = toy_oracle(PolynomialVPSDE())
    n_data, capacity, n_feat = toy.data.features.shape
    if not 1 <= cfg.molecules <= n_data:
        raise ValueError(f"--molecules {cfg.molecules}: expected 1..{n_data}")
    data = jax.tree.map(lambda a: a[: cfg.molecules], toy.data)
    teacher = rotation_augmented(data, toy.mask, toy.sde, cfg.rotations, key=jr.key(5), reflect=True)
    model = KarrasDenoiser(
        EGNN(n_feat, cfg.hidden, cfg.layers, key=jr.key(cfg.seed)), toy.sde, sigma_data=cfg.sigma_data
    )
    decay = (1.0 / cfg.lr_decay) ** (1.0 / cfg.steps)
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale_by_schedule(lambda c: -cfg.lr * decay**c)
    )
    state = init_state(model, optimizer)
    step = make_step(KarrasLoss(), optimizer, ema_decay=0.0, max_traces=1)
    masks, weights = jnp.broadcast_to(toy.mask, (cfg.batch, capacity)), jnp.ones(cfg.batch)
    rng, t0, rows_out = np.random.default_rng(cfg.seed), time.perf_counter(), []
    for i in range(1, cfg.steps + 1):
        rows = rng.integers(0, teacher.data.positions.shape[0], cfg.batch)
        mols = Molecule(teacher.data.positions[rows], teacher.data.features[rows])
        state, aux = step(state, mols, masks, weights, jr.key(7))
        if i % cfg.every == 0 or i == cfg.steps:
            loss = float(aux["loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"step {i}: loss is {loss}")
            row = {"step": i, "seconds": round(time.perf_counter() - t0, 1), "loss": loss}
            row["median_rmsd_A"] = {str(s): errors(state.model, teacher, s, jr.key(3)) for s in LEVELS}
            print(json.dumps(row if rows_out else {"config": asdict(cfg)} | row), flush=True)
            rows_out.append(row)
    return rows_out


if __name__ == "__main__":
    main(tyro.cli(Config))
