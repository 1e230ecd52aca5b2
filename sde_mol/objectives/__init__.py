"""Training objectives: AbstractObjective and its denoising, consistency and distillation variants."""

from .base import AbstractObjective as AbstractObjective
