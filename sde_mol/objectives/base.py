"""The objective interface: a loss for ONE molecule; the ABC provides the masked, vmapped batch loss.

`loss_one(model, mol, mask, *, key, step) -> (loss, aux)` returns a scalar loss and a dict of scalar diagnostics
for one padded molecule (an objective may accept other per-molecule pytrees too, e.g. progressive distillation's
`LevelledState`: a batch is whatever pytree `batch_loss` vmaps over). `model` is the differentiated argument (a
denoiser or consistency function); everything the loss needs that is not trained (the SDE, a teacher, dataset info)
is a field of the objective. `target` is the consistency target network (an EMA or stop-gradient copy of the
student), passed by the training step; objectives without a target ignore it. `batch_loss` vmaps over molecules
with per-molecule keys `fold_in(key, i)` and averages with the batch's weights (0 for fill-in rows of a final short
batch).
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PyTree

from ..molecule import Molecule
from ..typing import IntScalar, Key, NodeMask


class AbstractObjective(eqx.Module):
    """A training objective. Subclasses implement `loss_one` for one molecule."""

    @abc.abstractmethod
    def loss_one(
        self, model, mol: Molecule, mask: NodeMask, *, key: Key, step: IntScalar, target=None
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        raise NotImplementedError

    def batch_loss(
        self,
        model,
        mols: Molecule | PyTree,
        masks: Bool[Array, "batch n_atoms"],
        weights: Float[Array, " batch"],
        *,
        key: Key,
        step: IntScalar,
        target=None,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        n = masks.shape[0]
        keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(n))

        def one(mol, mask, k):
            return self.loss_one(model, mol, mask, key=k, step=step, target=target)

        losses, aux = jax.vmap(one)(mols, masks, keys)
        wsum = jnp.maximum(jnp.sum(weights), 1.0)
        loss = jnp.sum(losses * weights) / wsum
        aux = {name: jnp.sum(v * weights) / wsum for name, v in aux.items()}
        return loss, aux
