"""sde_mol: E(3)-equivariant diffusion, consistency and distillation models for 3D molecules in JAX."""

__version__ = "0.1.0"

from .molecule import (
    Molecule as Molecule,
    com_free_normal as com_free_normal,
    com_free_normal_log_prob as com_free_normal_log_prob,
    project as project,
    remove_com as remove_com,
)
