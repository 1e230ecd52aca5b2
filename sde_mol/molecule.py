"""Molecules as pytrees: positions and features with float leaves, a node mask beside them.

The state a diffusion model works on is a `Molecule`: `positions` (n_atoms, 3) and invariant `features`
(n_atoms, n_feat). Real atoms are marked by a boolean `mask` (n_atoms,) that travels beside the molecule.
Positions live in the centre-of-mass-free subspace: the unweighted mean over real atoms is zero, and every
padded slot is zero. That subspace has (M - 1) * 3 dimensions for M real atoms, which is what the CoM-free
Gaussian's log-density counts.

Molecules support `+`, `-`, unary `-`, and multiplication/division by scalars, so the maths reads like the
papers (`alpha * x0 + sigma * eps`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float

from .typing import Features, Key, NodeMask, Positions, Rotation, Scalar


class Molecule(eqx.Module):
    """One padded molecule (or, with leading batch axes, a batch of them)."""

    positions: Float[Array, "*batch n_atoms 3"]
    features: Float[Array, "*batch n_atoms n_feat"]

    def __add__(self, other: "Molecule") -> "Molecule":
        return Molecule(self.positions + other.positions, self.features + other.features)

    def __sub__(self, other: "Molecule") -> "Molecule":
        return Molecule(self.positions - other.positions, self.features - other.features)

    def __neg__(self) -> "Molecule":
        return Molecule(-self.positions, -self.features)

    def __mul__(self, scale) -> "Molecule":
        return Molecule(self.positions * scale, self.features * scale)

    __rmul__ = __mul__

    def __truediv__(self, scale) -> "Molecule":
        return Molecule(self.positions / scale, self.features / scale)

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[-2]

    @property
    def n_feat(self) -> int:
        return self.features.shape[-1]

    def to_array(self) -> Float[Array, "*batch n_atoms n_channels"]:
        """Concatenate to EDM's channel layout [x (3) | h (n_feat)]."""
        return jnp.concatenate([self.positions, self.features], axis=-1)

    @staticmethod
    def from_array(xh: Float[Array, "*batch n_atoms n_channels"]) -> "Molecule":
        return Molecule(xh[..., :3], xh[..., 3:])


def zeros_like(mol: Molecule) -> Molecule:
    return Molecule(jnp.zeros_like(mol.positions), jnp.zeros_like(mol.features))


def vdot(a: Molecule, b: Molecule) -> Float[Array, ""]:
    """Euclidean inner product over all entries (positions and features) of one molecule."""
    return jnp.sum(a.positions * b.positions) + jnp.sum(a.features * b.features)


def n_real(mask: NodeMask) -> Float[Array, ""]:
    """Number of real atoms M as a float scalar."""
    return jnp.sum(mask.astype(jnp.float32))


def com_dof(mask: NodeMask) -> Float[Array, ""]:
    """Degrees of freedom of the CoM-free position subspace, (M - 1) * 3."""
    return (n_real(mask) - 1.0) * 3.0


def remove_com(positions: Positions, mask: NodeMask) -> Positions:
    """Subtract the unweighted mean over real atoms; padded slots become zero."""
    m = mask[:, None].astype(positions.dtype)
    mean = jnp.sum(positions * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)
    return (positions - mean) * m


def mask_features(features: Features, mask: NodeMask) -> Features:
    return features * mask[:, None].astype(features.dtype)


def project(mol: Molecule, mask: NodeMask) -> Molecule:
    """Project onto the state space: CoM-free positions, all padded entries zero."""
    return Molecule(remove_com(mol.positions, mask), mask_features(mol.features, mask))


def com_free_normal(key: Key, mask: NodeMask, n_feat: int, dtype=jnp.float32) -> Molecule:
    """Standard normal on the state space: CoM-free positions (isotropic in the (M-1)*3 subspace), masked
    features. Projection of an iid Gaussian onto a linear subspace is the standard Gaussian on that subspace."""
    kx, kh = jr.split(key)
    n = mask.shape[0]
    x = jr.normal(kx, (n, 3), dtype)
    h = jr.normal(kh, (n, n_feat), dtype)
    return project(Molecule(x, h), mask)


def com_free_normal_log_prob(positions: Positions, mask: NodeMask, scale: Scalar = 1.0) -> Float[Array, ""]:
    """log N(x; 0, scale^2 I) on the CoM-free subspace, (M-1)*3 degrees of freedom. `positions` must be
    CoM-free (masked entries ignored)."""
    dof = com_dof(mask)
    sq = jnp.sum((positions * mask[:, None]) ** 2)
    return -0.5 * sq / scale**2 - dof * (0.5 * jnp.log(2 * jnp.pi) + jnp.log(scale))


def normal_log_prob(mol: Molecule, mask: NodeMask, scale: Scalar = 1.0) -> Float[Array, ""]:
    """Log-density of the state-space Gaussian `com_free_normal` scaled by `scale`: CoM-free positions
    ((M-1)*3 dims) plus M * n_feat feature dims."""
    lp_x = com_free_normal_log_prob(mol.positions, mask, scale)
    m = mask[:, None]
    d_h = n_real(mask) * mol.n_feat
    sq = jnp.sum((mol.features * m) ** 2)
    lp_h = -0.5 * sq / scale**2 - d_h * (0.5 * jnp.log(2 * jnp.pi) + jnp.log(scale))
    return lp_x + lp_h


def squared_error(a: Molecule, b: Molecule, mask: NodeMask) -> Float[Array, ""]:
    """||a - b||^2 over the real atoms' positions and features (padding ignored, whatever it holds)."""
    m = mask[:, None]
    return jnp.sum(jnp.where(m, (a.positions - b.positions) ** 2, 0.0)) + jnp.sum(
        jnp.where(m, (a.features - b.features) ** 2, 0.0)
    )


def state_dim(mask: NodeMask, n_feat: int) -> Float[Array, ""]:
    """Dimension of the state space: (M-1)*3 + M*n_feat."""
    return com_dof(mask) + n_real(mask) * n_feat


def random_orthogonal(key: Key, reflect: bool = True) -> Rotation:
    """Haar-random 3x3 orthogonal matrix (a rotation, or with `reflect` a rotation or a reflection with
    probability 1/2 each)."""
    k1, k2 = jr.split(key)
    a = jr.normal(k1, (3, 3))
    q, r = jnp.linalg.qr(a)
    q = q * jnp.sign(jnp.diag(r))[None, :]
    # make it a proper rotation, then flip with probability 1/2
    q = q * jnp.where(jnp.linalg.det(q) < 0, -1.0, 1.0)
    flip = jnp.where(reflect & jr.bernoulli(k2), -1.0, 1.0)
    return q * flip


def transform(mol: Molecule, mask: NodeMask, rotation: Rotation, translation: Float[Array, "3"]) -> Molecule:
    """Apply x -> x R^T + t to the real atoms (padded slots stay zero); features unchanged."""
    m = mask[:, None].astype(mol.positions.dtype)
    return Molecule((mol.positions @ rotation.T + translation) * m, mol.features)


def node_mask_from_counts(n_atoms: jax.typing.ArrayLike, capacity: int) -> Bool[Array, "*batch n_slots"]:
    """Prefix masks: the first M of `capacity` slots are real."""
    n_atoms = jnp.asarray(n_atoms)
    return jnp.arange(capacity) < n_atoms[..., None]


def pad_numpy(array: np.ndarray, capacity: int, axis: int = 0, value=0) -> np.ndarray:
    """Host-side padding of one molecule's per-atom array to `capacity` slots (never trims)."""
    n = array.shape[axis]
    if n > capacity:
        raise ValueError(f"molecule has {n} atoms, more than the capacity {capacity}")
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, capacity - n)
    return np.pad(array, widths, constant_values=value)
