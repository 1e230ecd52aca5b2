"""One run of consistency distillation (or iCT) of an MLP student against the exact oracle of K = 4 toy molecules
(`data.fixed.toy_oracle`, the oracle of tests/test_consistency.py), with the knobs of the one-step CT study
(experiments/NOTES.md); prints one JSON line with the fraction of 500 samples within 0.1 A of a molecule at 1, 2
and 4 steps, the hits per molecule, and the median / 90 % quantile of the distance to the nearest molecule
(`oracle.landing`). The student, its training (`train.fit_tiled`) and TCM's stage 2 (`truncated_loss`) are the
tests'.

Usage (each ~1-4 min on a 2-core CPU):
    python experiments/consistency_oracle_sweep.py                          # the test's setting
    python experiments/consistency_oracle_sweep.py --karras-sigma-max 80 --lr 6e-3 --steps 8000
    python experiments/consistency_oracle_sweep.py --index uniform --weighting uniform
    python experiments/consistency_oracle_sweep.py --method ct
    python experiments/consistency_oracle_sweep.py --uniform-fraction 0.3 --target-decay 0.95
    python experiments/consistency_oracle_sweep.py --stage2-steps 6000 --stage2-lr 2e-3      # + TCM's stage 2
    python experiments/consistency_oracle_sweep.py --method ct --stage2-steps 12000 --stage2-lr 3e-3 \
        --stage2-boundary-fraction 0.25                                                # CT, N = 161
    python experiments/consistency_oracle_sweep.py --method exact                            # the student's ceiling
    python experiments/consistency_oracle_sweep.py --stage2-steps 12000 --stage2-lr 3e-3 --ct-refine-steps 6000
                                                                       # CT's own fixed point, from a CD start
        [--ct-refine-target posterior]                                 # ... with CT's expected target

`--method exact` is no consistency objective but the yardstick for one: the same student, optimizer, distance
and budget, regressed at t_max directly on the exact one-step map (the oracle's PF-ODE from the prior noise by
the --n-points heun steps CD's teacher takes, whose end points all lie within 0.1 A of a molecule), fresh noise
every step. Its one-step rate is what this student and budget can reach when no target is bootstrapped.
"""

import json
import time
from dataclasses import asdict, dataclass
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import tyro

from sde_mol import train
from sde_mol.data.fixed import toy_oracle
from sde_mol.denoisers import ConsistencyFunction, TruncatedConsistencyFunction
from sde_mol.molecule import com_free_normal
from sde_mol.nn.egnn import MLPNet
from sde_mol.objectives import consistency as cm
from sde_mol.oracle import OracleDenoiser, landing
from sde_mol.run.build import solver_from_name
from sde_mol.samplers import consistency_solve, consistency_times
from sde_mol.schedules import constant_n, ict_n
from sde_mol.sde import KarrasSDE, PolynomialVPSDE

TRUNCATION = 0.16  # TCM's s' (tests/test_consistency.py): just above node 3 of the N = 18 grid of EDM's VP schedule
SAMPLE_KEYS = jr.split(jr.key(99), 500)  # sample i starts from the prior noise of key i at every step count


class MixtureIndex(cm.AbstractIndexSampler):
    """`base`'s interval index, replaced by a uniform one with probability `fraction`."""

    base: cm.AbstractIndexSampler
    fraction: float

    def __call__(self, n_points, s_min, s_max, rho, *, key):
        k_base, k_uniform, k_pick = jr.split(key, 3)
        n = self.base(n_points, s_min, s_max, rho, key=k_base)
        return jnp.where(
            jr.uniform(k_pick) < self.fraction, cm.UniformIndex()(n_points, s_min, s_max, rho, key=k_uniform), n
        )


class PosteriorCTLoss(cm.ConsistencyLoss):
    """CT's loss in expectation over the data point given x_{n+1}. For the oracle's K molecules the posterior is
    exact: x_{n+1} = alpha (x_k + s_{n+1} z_k) for every k with z_k = (x_{n+1} / alpha - x_k) / s_{n+1}, posterior
    weight w_k (the oracle's), and CT's target for k is f^-(alpha_n (x_k + s_n z_k)); the loss is
    sum_k w_k d(f(x_{n+1}), target_k). Its gradient is the mean of CT's over the data points that could have made
    x_{n+1}: the same fixed point, no target variance. Works with or without `boundary`. `oracle`: the K
    molecules and their posterior (required; a default only because the parent's fields have defaults)."""

    oracle: OracleDenoiser | None = None

    def loss_one(self, model, mol, mask, *, key, step, target=None):
        sde = model.sde
        target = model if target is None else target
        n, n_points, (s_cur, s_next, t_cur, t_next), _, z_next = self.draw(sde, mol, mask, key=key, step=step)
        (a_next, g_next), (a_cur, g_cur) = sde.marginal(t_next), sde.marginal(t_cur)
        w = jnp.exp(self.oracle.log_weights(t_next, z_next, mask))
        z_cur = jax.vmap(lambda x0: a_cur * x0 + g_cur * ((z_next - a_next * x0) * (1.0 / g_next)))(self.oracle.data)
        f_cur = jax.vmap(lambda z: self.target_at(target, sde, n, n_points, t_cur, z, mask))(z_cur)
        f_next = model(t_next, z_next, mask)
        d = jax.vmap(lambda fc: self.distance(f_next, fc, mask))(f_cur)
        return self.weighting(s_cur, s_next) * jnp.sum(w * d), {"sigma": s_next}


@dataclass(frozen=True)
class Config:
    method: Literal["cd", "ct", "exact"] = "cd"
    """cd, ct (iCT), or exact: regression on the exact one-step map at t_max (the module docstring)"""
    steps: int = 4000
    hidden: int = 512
    depth: int = 4
    index: Literal["lognormal", "uniform"] = "lognormal"
    uniform_fraction: float = 0.0
    """with --index lognormal: draw this fraction of the intervals uniformly instead (a mixture)"""
    p_mean: float = -1.1
    p_std: float = 2.0
    weighting: Literal["inverse_step", "uniform"] = "inverse_step"
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    n_points: int = 18
    """CD's N (CT: iCT's doubling curriculum 11 -> 161 over --steps)"""
    lr: float = 3e-3
    lr_decay: float = 300.0
    """the learning rate decays exponentially by this factor over the run"""
    batch: int = 128
    sigma_data: float = 1.0
    target_decay: float = 0.0
    """CD's target network: an EMA of the student with this rate mu (0: the stop-gradient student itself)"""
    karras_sigma_max: float | None = None
    """None: EDM's VP schedule in continuous time (PolynomialVPSDE, s_max 316); else KarrasSDE(sigma_max)"""
    seed: int = 1
    stage2_steps: int = 0
    """> 0: then TCM's stage 2 (Lee et al. 2025) for this many steps: a copy of the student trained on the
    intervals above s' = 0.16 (the tests' TRUNCATION; uniform index) with the frozen stage-1 student as the
    target at and below it; the scores are the joined `TruncatedConsistencyFunction`'s"""
    stage2_lr: float = 1e-3
    stage2_n_points: int | None = None
    """CT's stage-2 N (constant; None: the last N of stage 1); CD keeps --n-points"""
    stage2_boundary_fraction: float | None = None
    """the share of stage-2 draws on the boundary interval (TCM's boundary term); None: uniform over the
    intervals above s'"""
    ct_refine_steps: int = 0
    """> 0 (--method cd with --stage2-steps): then this many CT steps (the unbiased estimator, the stage-1
    boundary, a constant learning rate) on the CD stage-2 student: where CT's own fixed point lies, reached from
    a near-exact start; the scores before it are reported as `before_ct_refine`"""
    ct_refine_lr: float = 3e-4
    ct_refine_n_points: int = 161
    ct_refine_boundary_fraction: float = 0.25
    ct_refine_distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    ct_refine_c: float | None = None
    """the CT phase's pseudo-Huber c (None: iCT's 0.00054 sqrt(dim))"""
    ct_refine_target: Literal["sampled", "posterior"] = "sampled"
    """sampled: CT's estimator (x0 + s_n z, the data point and noise that made x_{n+1}); posterior: its exact
    expectation given x_{n+1}, the loss summed over the oracle's K molecules with their posterior weights
    (`PosteriorCTLoss`): CT with no target variance, whose fixed point is CT's population fixed point"""
    per_level: bool = False
    """also report, at 8 noise levels s, the student's error against the exact consistency function (the
    oracle's PF-ODE solved by 79 heun steps from s down to s_min) on 200 noised data points"""


def mlp_student(oracle: OracleDenoiser, cfg: Config) -> ConsistencyFunction:
    """The tests' MLP consistency function on the oracle's SDE."""
    _, capacity, n_feat = oracle.data.features.shape
    net = MLPNet(capacity, n_feat, cfg.hidden, cfg.depth, key=jr.key(cfg.seed))
    return ConsistencyFunction(net, oracle.sde, sigma_data=cfg.sigma_data)


def train_student(oracle: OracleDenoiser, objective, student, steps: int, *, lr: float, batch: int, lr_decay: float,
                  with_target: bool, target_decay=None):  # fmt: skip
    """The tests' `train_student`: Adam on the K molecules tiled to `batch`, the learning rate decayed
    exponentially from `lr` by `lr_decay`, the same step key; the final weights."""
    return train.fit_tiled(
        objective, student, oracle.data, oracle.mask, steps=steps, batch=batch, lr=lr, lr_decay=lr_decay,
        key=jr.key(7), with_target=with_target, target_decay=target_decay,
    )  # fmt: skip


def main(cfg: Config) -> dict:
    if cfg.ct_refine_steps > 0 and (cfg.method != "cd" or cfg.stage2_steps <= 0):
        raise ValueError("--ct-refine-steps: needs --method cd and --stage2-steps > 0 (it starts from CD's stage 2)")
    sde = PolynomialVPSDE() if cfg.karras_sigma_max is None else KarrasSDE(sigma_max=cfg.karras_sigma_max)
    oracle = toy_oracle(sde)
    index = cm.LogNormalIndex(cfg.p_mean, cfg.p_std) if cfg.index == "lognormal" else cm.UniformIndex()
    if cfg.uniform_fraction > 0:
        index = MixtureIndex(index, cfg.uniform_fraction)
    weighting = cm.InverseStepWeighting() if cfg.weighting == "inverse_step" else cm.UniformWeighting()
    distance = cm.PseudoHuberDistance() if cfg.distance == "pseudo_huber" else cm.L2Distance()
    if cfg.method == "exact":
        return exact_regression(cfg, oracle, distance)
    if cfg.method == "cd":
        estimator, curriculum = (
            cm.TeacherStep(oracle, solver_from_name("heun")),
            eqx.Partial(constant_n, n=cfg.n_points),
        )
    else:
        estimator, curriculum = cm.UnbiasedEstimator(), eqx.Partial(ict_n, total_steps=cfg.steps, s0=10, s1=160)
    objective = cm.ConsistencyLoss(estimator, curriculum, distance, weighting, index)
    with_target = cfg.method == "cd"
    t0 = time.perf_counter()
    fit = dict(batch=cfg.batch, lr_decay=cfg.lr_decay)
    target_decay = (lambda k: cfg.target_decay) if with_target else None
    f = train_student(
        oracle, objective, mlp_student(oracle, cfg), cfg.steps, lr=cfg.lr, with_target=with_target,
        target_decay=target_decay, **fit,
    )  # fmt: skip
    if cfg.stage2_steps > 0:
        n_points = None
        if cfg.method == "ct":  # constant: stage 1's last N unless given
            n_points = eqx.Partial(constant_n, n=cfg.stage2_n_points or int(curriculum(cfg.steps - 1)))
        stage2 = cm.truncated_loss(
            objective, f, TRUNCATION, n_points=n_points, boundary_fraction=cfg.stage2_boundary_fraction
        )
        high = train_student(
            oracle, stage2, f, cfg.stage2_steps, lr=cfg.stage2_lr, with_target=with_target,
            target_decay=(lambda k: 0.0) if with_target else None, **fit,
        )  # fmt: skip
        f = TruncatedConsistencyFunction(f, high, TRUNCATION)
    before = None
    if cfg.ct_refine_steps > 0:
        before = scores(f, oracle, (1, 2, 4))
        f = ct_refine(cfg, oracle, f, weighting)
    out = {"config": asdict(cfg), "train_s": round(time.perf_counter() - t0, 1)} | scores(f, oracle, (1, 2, 4))
    if before is not None:
        out["before_ct_refine"] = before
    if cfg.per_level:
        out["per_level"] = per_level_errors(f, oracle, estimator if cfg.method == "cd" else None)
    print(json.dumps(out), flush=True)
    return out


def ct_refine(cfg: Config, oracle: OracleDenoiser, f, weighting: cm.AbstractWeighting):
    """--ct-refine-steps: TCM-CT stage 2 started from the CD stage-2 student `f.high`, boundary `f.low`."""
    if cfg.ct_refine_distance == "l2":
        distance = cm.L2Distance()
    else:
        distance = cm.PseudoHuberDistance(c=cfg.ct_refine_c)
    ct = (cm.UnbiasedEstimator(), eqx.Partial(constant_n, n=cfg.ct_refine_n_points), distance, weighting)
    loss = cm.ConsistencyLoss(*ct) if cfg.ct_refine_target == "sampled" else PosteriorCTLoss(*ct, oracle=oracle)
    objective = cm.truncated_loss(loss, f.low, TRUNCATION, boundary_fraction=cfg.ct_refine_boundary_fraction)
    high = train_student(
        oracle, objective, f.high, cfg.ct_refine_steps, lr=cfg.ct_refine_lr, batch=cfg.batch, lr_decay=1.0,
        with_target=False,
    )  # fmt: skip
    return TruncatedConsistencyFunction(f.low, high, TRUNCATION)


def consistency_positions(f, oracle: OracleDenoiser, n_steps: int):
    """Positions of the real atoms of n_steps consistency samples at the default times (Song et al. 2023,
    Algorithm 1), sample i from SAMPLE_KEYS[i] split into (prior, re-noising) keys at every step count."""
    sde, mask, n_feat = oracle.sde, oracle.mask, oracle.data.features.shape[-1]
    ts = consistency_times(sde, n_steps)

    def one(key):
        k_prior, k_steps = jr.split(key)
        x = f(sde.t_max, sde.prior(mask, n_feat, key=k_prior), mask)
        return consistency_solve(f, sde, x, mask, ts, key=k_steps).positions

    return np.asarray(jax.jit(jax.vmap(one))(SAMPLE_KEYS))[:, np.asarray(mask)]


def scores(f, oracle: OracleDenoiser, steps) -> dict:
    out = {}
    for n in steps:
        r = landing(consistency_positions(f, oracle, n), oracle)
        out[f"{n}_step"] = {
            "within_0.1A": r.within, "hits_per_molecule": r.hits.tolist(), "median_A": r.median, "q90_A": r.q90
        }  # fmt: skip
    return out


def flow_end(step: cm.TeacherStep, oracle: OracleDenoiser, n_points: int, top: int, z):
    """The oracle's PF-ODE end point (at s_min, divided by alpha(t_min)) of the state z at node `top` of the
    N-point grid: `top` teacher steps down the grid."""
    sde = oracle.sde
    grid = cm.ConsistencyLoss(step, eqx.Partial(constant_n, n=n_points))

    def body(i, z):
        _, _, t_cur, t_next = grid.grid_pair(sde, top - 1 - i, n_points)
        return step(z, z, z, oracle.mask, t_next, t_cur)  # a teacher step reads only z_next

    return jax.lax.fori_loop(0, top, body, z) / sde.marginal(sde.t_min)[0]


def exact_regression(cfg: Config, oracle: OracleDenoiser, distance: cm.AbstractDistance) -> dict:
    """--method exact: `cfg.steps` Adam steps (the tests' schedule) of the student at t_max on the exact
    one-step map of fresh prior draws; prints and returns the one-step scores (JSON)."""
    sde, mask, n_feat = oracle.sde, oracle.mask, oracle.data.features.shape[-1]
    step = cm.TeacherStep(oracle, solver_from_name("heun"))

    def exact_end(z):
        return flow_end(step, oracle, cfg.n_points, cfg.n_points - 1, z)

    student = mlp_student(oracle, cfg)
    decay = (1.0 / cfg.lr_decay) ** (1.0 / cfg.steps)
    optimizer = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(lambda c: -cfg.lr * decay**c))

    @eqx.filter_jit
    def update(f, opt_state, key):
        z = jax.vmap(lambda k: sde.prior(mask, n_feat, key=k))(jr.split(key, cfg.batch))
        target = jax.vmap(exact_end)(z)

        def loss(f):
            out = jax.vmap(lambda z: f(sde.t_max, z, mask))(z)
            return jnp.mean(jax.vmap(lambda a, b: distance(a, b, mask))(out, target))

        value, grads = eqx.filter_value_and_grad(loss)(f)
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(f, updates), opt_state, value

    f, opt_state = student, optimizer.init(eqx.filter(student, eqx.is_array))
    t0 = time.perf_counter()
    for key in jr.split(jr.key(cfg.seed + 100), cfg.steps):
        f, opt_state, value = update(f, opt_state, key)
    if not np.isfinite(float(value)):
        raise FloatingPointError(f"exact regression: loss is {float(value)} after {cfg.steps} steps")
    out = {"config": asdict(cfg), "train_s": round(time.perf_counter() - t0, 1)} | scores(f, oracle, (1,))
    print(json.dumps(out), flush=True)
    return out


def per_level_errors(f, oracle: OracleDenoiser, teacher_step: cm.TeacherStep | None, n_fine: int = 80) -> list[dict]:
    """[{s, median RMSD of f(t_s, z) to the exact flow-map end point, fraction within 0.1 A}] at fine-grid
    levels from s_max down; z = alpha (x + s eps) for data molecules x."""
    sde, mask, data = oracle.sde, oracle.mask, oracle.data
    n_data, n_feat, n_real = data.positions.shape[0], data.features.shape[-1], int(mask.sum())
    step = teacher_step or cm.TeacherStep(oracle, solver_from_name("heun"))
    grid = cm.ConsistencyLoss(step, eqx.Partial(constant_n, n=n_fine))
    rows = []
    for top in (n_fine - 1, 70, 60, 50, 40, 30, 20, 10):
        t = grid.grid_pair(sde, top - 1, n_fine)[3]  # grid node `top` (exactly t_max for the last one)
        alpha, sigma = sde.marginal(t)

        def exact_end(z, top=top):
            return flow_end(step, oracle, n_fine, top, z)

        def error(key, t=t, alpha=alpha, sigma=sigma, exact_end=exact_end):
            k_mol, k_noise = jr.split(key)
            x = jax.tree.map(lambda a: a[jr.randint(k_mol, (), 0, n_data)], data)
            z = alpha * x + sigma * com_free_normal(k_noise, mask, n_feat, jnp.float32)
            diff = (exact_end(z).positions - f(t, z, mask).positions)[:n_real]
            return jnp.sqrt((diff**2).sum(-1).mean())

        d = np.asarray(jax.jit(jax.vmap(error))(jr.split(jr.key(3), 200)))
        rows.append(
            {"s": float(sigma / alpha), "median_A": float(np.median(d)), "within_0.1A": float(np.mean(d < 0.1))}
        )
    return rows


if __name__ == "__main__":
    main(tyro.cli(Config))
