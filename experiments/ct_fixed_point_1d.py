"""Where consistency training's population fixed point lies, exactly, for data of a few points on a line.

For x0 drawn from weighted points x_k and x = x0 + s z (VE, Karras grid s_0 < ... < s_{N-1}), a consistency
function f_n(x) = f(x, s_n) trained to zero loss on every interval satisfies a recursion over the levels that a
grid in x computes exactly (no network, no sampling noise), starting from f_0(x) = x:

    cd  (the exact teacher's Euler step):  f_{n+1}(x) = f_n(x - (s_{n+1} - s_n) E[z | x])
    l2  (CT, squared distance):            f_{n+1}(x) = sum_k w_k(x) f_n(y_k)
    l1  (CT, absolute distance):           f_{n+1}(x) = the w(x)-weighted median of the f_n(y_k)

with w_k(x) the posterior weight of point k at level s_{n+1} and y_k = x_k + s_n (x - x_k) / s_{n+1} the CT
target's state when x0 = x_k (the same noise z). iCT's pseudo-Huber distance with c far below the distance
between the points is the l1 case where the targets split between points. The one-step sampler's output
f_{N-1}(x), x ~ N(0, s_max^2), is scored: the prior mass within --tol of a point, per point (the data weights
are the exact answer).

Each (target, N) prints one JSON line, then one line with the config, the data weights and every row. Results:
experiments/NOTES.md ("CT's population fixed point in one dimension"); tests/test_ct_fixed_point.py checks them.

Usage:
    python experiments/ct_fixed_point_1d.py [--points -1 0.2 1] [--weights 0.25 0.25 0.5] [--n-points 18 161 641 2561]
"""

import json
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import tyro


@dataclass(frozen=True)
class Config:
    points: tuple[float, ...] = (-1.0, 0.2, 1.0)
    weights: tuple[float, ...] = (0.25, 0.25, 0.5)
    n_points: tuple[int, ...] = (18, 161, 641, 2561)
    """the discretisations N to solve"""
    targets: tuple[Literal["cd", "l1", "l2"], ...] = ("cd", "l1", "l2")
    s_min: float = 0.002
    s_max: float = 80.0
    rho: float = 7.0
    grid: int = 20001
    """grid points per level, over +-6 marginal standard deviations (linear interpolation between them)"""
    tol: float = 0.05


def karras_levels(n: int, s_min: float, s_max: float, rho: float) -> np.ndarray:
    i = np.arange(n) / (n - 1)
    return (s_min ** (1 / rho) + i * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row-wise: the smallest value whose cumulative weight (values sorted) reaches half."""
    order = np.argsort(values, axis=1)
    v, w = np.take_along_axis(values, order, 1), np.take_along_axis(weights, order, 1)
    first = (np.cumsum(w, axis=1) >= 0.5).argmax(axis=1)
    return v[np.arange(len(v)), first]


def fixed_point(cfg: Config, target: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(x grid at s_max, f(x, s_max)) of the recursion named `target` on the n-level grid."""
    xk, pk = np.asarray(cfg.points), np.asarray(cfg.weights) / np.sum(cfg.weights)
    spread = np.max(np.abs(xk)) + 1.0
    s = karras_levels(n, cfg.s_min, cfg.s_max, cfg.rho)
    x_prev = np.linspace(-6.0, 6.0, cfg.grid) * np.sqrt(s[0] ** 2 + spread**2)
    f_prev = x_prev.copy()
    for s_cur, s_next in zip(s[:-1], s[1:], strict=True):
        x = np.linspace(-6.0, 6.0, cfg.grid) * np.sqrt(s_next**2 + spread**2)
        logw = np.log(pk)[None] - (x[:, None] - xk[None]) ** 2 / (2.0 * s_next**2)
        w = np.exp(logw - logw.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        if target == "cd":
            ez = (w * (x[:, None] - xk[None])).sum(axis=1) / s_next
            f = np.interp(x - (s_next - s_cur) * ez, x_prev, f_prev)
        else:
            values = np.interp(xk[None] + s_cur * (x[:, None] - xk[None]) / s_next, x_prev, f_prev)
            f = (w * values).sum(axis=1) if target == "l2" else weighted_median(values, w)
        x_prev, f_prev = x, f
    return x_prev, f_prev


def score(cfg: Config, x: np.ndarray, f: np.ndarray) -> dict:
    prior = np.exp(-(x**2) / (2.0 * cfg.s_max**2))
    prior /= prior.sum()
    near = np.abs(f[:, None] - np.asarray(cfg.points)[None]) < cfg.tol
    mass = [float((prior * near[:, k]).sum()) for k in range(len(cfg.points))]
    return {"within_tol": round(sum(mass), 4), "mass_per_point": [round(m, 4) for m in mass]}


def main(cfg: Config) -> list[dict]:
    if len(cfg.points) != len(cfg.weights) or min(cfg.weights) <= 0:
        raise ValueError(f"--points {cfg.points} and --weights {cfg.weights}: one positive weight per point")
    if min(cfg.n_points) < 2 or not set(cfg.targets) <= {"cd", "l1", "l2"}:
        raise ValueError(f"--n-points {cfg.n_points} must be >= 2 and --targets {cfg.targets} from cd, l1, l2")
    rows = []
    for target in cfg.targets:
        for n in cfg.n_points:
            rows.append({"target": target, "n_points": n} | score(cfg, *fixed_point(cfg, target, n)))
            print(json.dumps(rows[-1]), flush=True)
    exact = (np.asarray(cfg.weights) / np.sum(cfg.weights)).round(4).tolist()
    print(json.dumps({"config": asdict(cfg), "data_weights": exact, "rows": rows}))
    return rows


if __name__ == "__main__":
    main(tyro.cli(Config))
