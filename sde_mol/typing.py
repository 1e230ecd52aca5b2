"""jaxtyping aliases with named dimensions; the only place they are defined.

Named dims used throughout sde_mol:
  n_atoms   padded atom slots of one molecule (29 for QM9)
  n_feat    invariant feature channels of the diffusion state (6 for QM9 with charges)
  batch     molecules in a batch
"""

from typing import Protocol, TypeAlias, runtime_checkable

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

Positions: TypeAlias = Float[Array, "n_atoms 3"]
Features: TypeAlias = Float[Array, "n_atoms n_feat"]
NodeMask: TypeAlias = Bool[Array, " n_atoms"]
EdgeMask: TypeAlias = Bool[Array, "n_atoms n_atoms"]
Real: TypeAlias = Float[Array, ""]
Scalar: TypeAlias = Float[Array, ""] | float
IntScalar: TypeAlias = Int[Array, ""] | int
Key: TypeAlias = PRNGKeyArray
Rotation: TypeAlias = Float[Array, "3 3"]

BatchPositions: TypeAlias = Float[Array, "batch n_atoms 3"]
BatchFeatures: TypeAlias = Float[Array, "batch n_atoms n_feat"]
BatchNodeMask: TypeAlias = Bool[Array, "batch n_atoms"]

# Host-side (numpy) arrays: decoded molecules handed to metrics and file writers.
NpPositions: TypeAlias = Float[np.ndarray, "batch n_atoms 3"]
NpAtomTypes: TypeAlias = Int[np.ndarray, "batch n_atoms"]  # index into the atom decoder, -1 on padding

ArrayLike: TypeAlias = jax.typing.ArrayLike


@runtime_checkable
class HasNet(Protocol):
    """A model whose trainable parameters are the leaves of its one network `net` (the denoisers that wrap an
    EGNN, the autoencoder); everything else in it (its SDE, constants) is frozen in training."""

    net: eqx.Module


@runtime_checkable
class HasSigmaData(Protocol):
    """A denoiser preconditioned for data of standard deviation `sigma_data` (Karras et al. 2022): what
    `objectives.denoising.KarrasLoss` weights its error by."""

    sigma_data: float
