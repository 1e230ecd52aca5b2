"""Exact denoisers: ground truth for testing SDEs, samplers and distillation without a trained network.

`OracleDenoiser`: the data distribution is the empirical distribution of K fixed molecules x_1..x_K of one
size (one mask). Then q(z_t) is a mixture of K Gaussians N(alpha x_k, sigma^2 I) on the state space and

    E[x0 | z_t = z] = sum_k w_k(z) x_k,   w = softmax_k( -||z - alpha x_k||^2 / (2 sigma^2) ),

with the squared norm over the state space (CoM-free positions, real atoms' features). Every sampler run
with it must land on the K molecules with equal frequencies.

The plain oracle is NOT E(3)-equivariant: the K molecules sit in fixed orientations, so rotating z does not
rotate the estimate (a sampler lands on the molecules in their stored frames, which is what lets a test
compare positions without a rotation search). `rotation_augmented` builds the oracle of K * R molecules under
R fixed random rotations (optionally reflections), an approximately invariant data distribution.

`nearest` and `landing` score samples against the K molecules: the RMSD of each sample to its nearest molecule
in the same frame, d_i = min_k sqrt(mean_atoms ||y_i - x_k||^2), and the fraction with d_i < tol ("landed").

`GaussianOracle`: x0 ~ N(mu, s^2 I) on the state space, for which E[x0 | z_t] is linear in z and every
marginal is Gaussian with known mean and variance: a closed-form check of an SDE's drifts and solvers.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int

from .denoisers import AbstractX0Denoiser
from .molecule import Molecule, project, random_orthogonal, transform
from .sde import AbstractSDE
from .typing import Key, NodeMask, Scalar


class OracleDenoiser(AbstractX0Denoiser):
    """Exact x0 denoiser of the empirical distribution of `data` (a Molecule with a leading axis of K
    molecules in the state space, all with the real atoms given by `mask`)."""

    data: Molecule
    mask: NodeMask
    sde: AbstractSDE

    def log_weights(self, t: Scalar, z: Molecule, mask: NodeMask) -> Float[Array, " n_data"]:
        """Normalised log posterior log p(k | z_t = z), k = 1..K."""
        alpha, sigma = self.sde.marginal(t)

        def sq_dist(x: Molecule) -> Float[Array, ""]:
            diff = project(z - alpha * x, mask)
            return jnp.sum(diff.positions**2) + jnp.sum(diff.features**2)

        logits = -jax.vmap(sq_dist)(self.data) / (2.0 * sigma**2)
        return jax.nn.log_softmax(logits)

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        w = jnp.exp(self.log_weights(t, z, mask))
        return Molecule(jnp.tensordot(w, self.data.positions, axes=1), jnp.tensordot(w, self.data.features, axes=1))


def rotation_augmented(
    data: Molecule, mask: NodeMask, sde: AbstractSDE, n_rotations: int, *, key: Key, reflect: bool = False
) -> OracleDenoiser:
    """Oracle of the K * R molecules {R_r x_k}: each of the K molecules under R fixed Haar-random rotations
    (rotations or reflections with `reflect`), rotation r drawn with `jr.fold_in(key, r)`. Ordering: index
    r * K + k."""

    def rotate_all(r: Array) -> Molecule:
        rot = random_orthogonal(jr.fold_in(key, r), reflect=reflect)
        return jax.vmap(lambda x: transform(x, mask, rot, jnp.zeros(3)))(data)

    rotated = jax.vmap(rotate_all)(jnp.arange(n_rotations))
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), rotated)
    return OracleDenoiser(flat, mask, sde)


def nearest(
    positions: Float[np.ndarray, "n_samples n_real 3"], oracle: OracleDenoiser
) -> tuple[Float[np.ndarray, " n_samples"], Int[np.ndarray, " n_samples"]]:
    """(RMSD of each sample to the nearest of the oracle's molecules, that molecule's index k), in the stored
    frames (no rotation search). `positions`: the samples' real atoms, those of `oracle.mask`, on the host."""
    x = np.asarray(oracle.data.positions)[:, np.asarray(oracle.mask)]
    d = np.sqrt(((positions[:, None] - x[None]) ** 2).sum(-1).mean(-1))
    return d.min(1), d.argmin(1)


class Landing(NamedTuple):
    """How samples land on an oracle's K molecules (`landing`)."""

    within: float  # fraction of the samples within tol of a molecule
    hits: Int[np.ndarray, " n_data"]  # of those, how many on each molecule
    median: float  # median RMSD to the nearest molecule
    q90: float  # its 90 % quantile


def landing(positions: Float[np.ndarray, "n_samples n_real 3"], oracle: OracleDenoiser, *, tol: float = 0.1) -> Landing:
    """Score samples (their real atoms, on the host) against the oracle's molecules by `nearest`."""
    d, k = nearest(positions, oracle)
    hits = np.bincount(k[d < tol], minlength=oracle.data.positions.shape[0])
    return Landing(float(np.mean(d < tol)), hits, float(np.median(d)), float(np.quantile(d, 0.9)))


class GaussianOracle(AbstractX0Denoiser):
    """Exact denoiser for x0 ~ N(mean, scale^2 I) on the state space (`mean` in the state space):
    z_t ~ N(alpha mean, (alpha^2 scale^2 + sigma^2) I) and
    E[x0 | z_t = z] = mean + alpha scale^2 / (alpha^2 scale^2 + sigma^2) (z - alpha mean)."""

    mean: Molecule
    scale: float
    sde: AbstractSDE

    def marginal_std(self, t: Scalar) -> Float[Array, ""]:
        """Per-dimension standard deviation of z_t."""
        alpha, sigma = self.sde.marginal(t)
        return jnp.sqrt((alpha * self.scale) ** 2 + sigma**2)

    def __call__(self, t: Scalar, z: Molecule, mask: NodeMask) -> Molecule:
        alpha, sigma = self.sde.marginal(t)
        gain = alpha * self.scale**2 / ((alpha * self.scale) ** 2 + sigma**2)
        return project(self.mean + gain * (z - alpha * self.mean), mask)


def toy_molecules(
    key: Key,
    n_molecules: int,
    n_atoms: int,
    capacity: int,
    *,
    bond_length: float = 1.5,
    min_distance: float = 1.2,
    atomic_numbers: tuple[int, ...] = (1, 6, 7, 8, 9),
) -> tuple[Molecule, NodeMask]:
    """K random molecule-like point clouds of one size, for oracle tests: each atom bonds to a random earlier
    atom at `bond_length` in a random direction (the first of 64 candidates that keeps every pair at least
    `min_distance` apart), positions CoM-free; random atom types with EDM's normalised features
    [one-hot / 4 | Z / 10]. Returns (molecules with a leading K axis, mask with the first n_atoms real)."""
    mask = jnp.arange(capacity) < n_atoms
    n_types = len(atomic_numbers)

    def one(key: Key) -> Molecule:
        k_pos, k_type = jr.split(key)

        def place(i, x):
            k_parent, k_dir = jr.split(jr.fold_in(k_pos, i))
            parent = jr.randint(k_parent, (64,), 0, i)
            direction = jr.normal(k_dir, (64, 3))
            direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
            cand = x[parent] + bond_length * direction
            dist = jnp.linalg.norm(cand[:, None, :] - x[None, :, :], axis=-1)
            ok = jnp.all((dist >= min_distance) | (jnp.arange(capacity) >= i)[None, :], axis=-1)
            return x.at[i].set(cand[jnp.argmax(ok)])

        x = jax.lax.fori_loop(1, n_atoms, place, jnp.zeros((capacity, 3)))
        types = jr.randint(k_type, (capacity,), 0, n_types)
        one_hot = jax.nn.one_hot(types, n_types) / 4.0
        charge = jnp.asarray(atomic_numbers, jnp.float32)[types][:, None] / 10.0
        return project(Molecule(x, jnp.concatenate([one_hot, charge], axis=-1)), mask)

    return jax.vmap(one)(jr.split(key, n_molecules)), mask
