"""Equivariant autoencoder of GeoLDM (Xu et al. 2023): molecules <-> per-atom latents, for ONE molecule.

A latent is a `Molecule`: per atom a CoM-free 3D point (equivariant) and `latent_channels` = k invariant
channels. Latent diffusion is then the SAME SDE / objective / sampler code run on latent molecules with
n_feat = k (`sde_mol.latent`).

    encoder   (x, h) -> EGNN -> mu_x = x + dx (CoM-free),  mu_h = W_enc h_out          q(z | x, h) = N(mu, s^2 I)
    decoder   z = (z_x, z_h) -> EGNN -> x_rec = z_x + dx,   logits = W_dec h_out       (atom types)

Both are the library's EGNN (`nn.egnn.EGNN`, no time input) with `width` invariant input/output channels:
the data features (EDM's [one-hot / 4 | Z / 10], 6 channels) or the k latent channels are zero-padded to
`width` on the way in, and the first linear head reads the `width` output channels, so a narrow latent
(GeoLDM uses k = 1 on QM9) does not narrow the decoder's type read-out. Positions go through the EGNN's
equivariant coordinate updates only, so x_rec and mu_x rotate with the input, and mu_h and the logits are
invariant (tested). The posterior std s is fixed, GeoLDM's 0.0032 (about EDM's sigma(0)): its encoder's
learned stds are not used either.

Loss (`AutoencoderLoss`, GeoLDM's `EnHierarchicalVAE.compute_loss` with a small KL): z ~ q(z | x, h),
    recon = ||x_rec - x||^2 + sum_i CE(logits_i, type_i)        over real atoms
    KL    = KL(N(mu, s^2 I) || N(0, I)) on the latent state space ((M - 1) 3 + M k dimensions)
    loss  = recon / dim_x + kl_weight KL / dim_z
with dim_x = (M - 1) 3 + M n_types and dim_z = (M - 1) 3 + M k. GeoLDM divides the reconstruction by
(3 + n_feat) N_pad and sums the KL; averaging both per dimension makes `kl_weight` a plain ratio that does not
change with molecule size or padding. Charges are not decoded separately: on QM9 the atom type determines the
atomic number, and `decode` writes EDM's normalised [one-hot / 4 | Z / 10] features, so `samplers.decode`
reads decoded latents like any sample.

Trainable parameters live in `net` (the convention of `train.trainable_filter`), constants outside it.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int

from ..data.qm9 import DatasetInfo
from ..molecule import Molecule, com_free_normal, n_real, project, remove_com
from ..objectives.base import AbstractObjective
from ..typing import IntScalar, Key, NodeMask
from .egnn import EGNN

POSTERIOR_STD = 0.0032  # GeoLDM's fixed encoder std (about EDM's sigma(0) = 0.00316)


def _pad_channels(h: Float[Array, "n_atoms c"], width: int) -> Float[Array, "n_atoms width"]:
    return jnp.pad(h, ((0, 0), (0, width - h.shape[-1])))


class AutoencoderNet(eqx.Module):
    """The trainable part: encoder and decoder EGNNs and their linear invariant heads."""

    encoder: EGNN
    encoder_head: eqx.nn.Linear
    decoder: EGNN
    decoder_head: eqx.nn.Linear


class EquivariantAutoencoder(eqx.Module):
    """GeoLDM's E(3)-equivariant autoencoder (module docstring). Build with `EquivariantAutoencoder.build`."""

    net: AutoencoderNet
    latent_channels: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    info: DatasetInfo = eqx.field(static=True)
    posterior_std: float = eqx.field(static=True, default=POSTERIOR_STD)

    @classmethod
    def build(
        cls,
        info: DatasetInfo,
        *,
        latent_channels: int,
        hidden: int = 64,
        encoder_layers: int = 1,
        decoder_layers: int = 4,
        width: int = 16,
        key: Key,
        posterior_std: float = POSTERIOR_STD,
    ) -> "EquivariantAutoencoder":
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        if width < max(info.n_feat, latent_channels, info.n_types):
            raise ValueError(
                f"width {width} must be at least the data features ({info.n_feat}), the latent channels "
                f"({latent_channels}) and the atom types ({info.n_types})"
            )
        k_enc, k_enc_head, k_dec, k_dec_head = jr.split(key, 4)
        # GeoLDM's QM9 EGNNs: attention, tanh-bounded coordinate updates, sum aggregation; no time input
        common = dict(attention=True, tanh=True, condition_time=False)
        net = AutoencoderNet(
            encoder=EGNN(width, hidden, encoder_layers, key=k_enc, **common),
            encoder_head=eqx.nn.Linear(width, latent_channels, key=k_enc_head),
            decoder=EGNN(width, hidden, decoder_layers, key=k_dec, **common),
            decoder_head=eqx.nn.Linear(width, info.n_types, key=k_dec_head),
        )
        return cls(net, int(latent_channels), int(width), info, float(posterior_std))

    # --- encoder -------------------------------------------------------------------------------------------

    def encode(self, mol: Molecule, mask: NodeMask) -> Molecule:
        """Posterior mean mu = (mu_x, mu_h) of q(z | x, h), in the latent state space."""
        h = _pad_channels(mol.features, self.width)
        dx, h_out = self.net.encoder(mol.positions, h, mask, jnp.zeros(()))
        mu_x = remove_com(jnp.where(mask[:, None], mol.positions, 0.0) + dx, mask)
        mu_h = jax.vmap(self.net.encoder_head)(h_out)
        return project(Molecule(mu_x, mu_h), mask)

    def sample_latent(self, mol: Molecule, mask: NodeMask, *, key: Key) -> Molecule:
        """z = mu + s eps, eps standard normal on the latent state space."""
        mu = self.encode(mol, mask)
        return mu + self.posterior_std * com_free_normal(key, mask, self.latent_channels, mu.positions.dtype)

    # --- decoder -------------------------------------------------------------------------------------------

    def decode_logits(
        self, z: Molecule, mask: NodeMask
    ) -> tuple[Float[Array, "n_atoms 3"], Float[Array, "n_atoms n_types"]]:
        """(reconstructed CoM-free positions, atom-type logits; both zero on padding)."""
        dx, h_out = self.net.decoder(z.positions, _pad_channels(z.features, self.width), mask, jnp.zeros(()))
        x_rec = remove_com(jnp.where(mask[:, None], z.positions, 0.0) + dx, mask)
        logits = jax.vmap(self.net.decoder_head)(h_out)
        return x_rec, jnp.where(mask[:, None], logits, 0.0)

    def features_of(self, types: Int[Array, " n_atoms"], mask: NodeMask) -> Float[Array, "n_atoms n_feat"]:
        """EDM's normalised features of atom types: [(one_hot - b_h) / n_h | (Z - b_c) / n_c], masked."""
        info = self.info
        _, n_h, n_c = info.norm_values
        _, b_h, b_c = info.norm_biases
        parts = [(jax.nn.one_hot(types, info.n_types) - b_h) / n_h]
        if info.include_charges:
            z = jnp.asarray(info.atomic_numbers, jnp.float32)[types]
            parts.append(((z - b_c) / n_c)[:, None])
        return jnp.concatenate(parts, axis=-1) * mask[:, None]

    def decode(self, z: Molecule, mask: NodeMask) -> Molecule:
        """A latent molecule -> a data-space molecule (positions, normalised features of the argmax types)."""
        x_rec, logits = self.decode_logits(z, mask)
        types = jnp.argmax(logits, axis=-1)
        return Molecule(x_rec, self.features_of(types, mask))

    def types_of(self, mol: Molecule) -> Int[Array, " n_atoms"]:
        """Atom-type indices of a data-space molecule (argmax of its type channels)."""
        return jnp.argmax(mol.features[:, : self.info.n_types], axis=-1)


# --- training loss and reconstruction metrics ---------------------------------------------------------------


def gaussian_kl_to_standard(mu: Molecule, std: float, mask: NodeMask) -> Float[Array, ""]:
    """KL(N(mu, std^2 I) || N(0, I)) on the latent state space ((M - 1) 3 + M k dimensions; `mu` in it)."""
    m = mask[:, None]
    sq = jnp.sum(jnp.where(m, mu.positions**2, 0.0)) + jnp.sum(jnp.where(m, mu.features**2, 0.0))
    dim = (n_real(mask) - 1.0) * 3.0 + n_real(mask) * mu.n_feat
    var = jnp.float32(std) ** 2
    return 0.5 * (sq + dim * (var - 1.0 - jnp.log(var)))


def reconstruction_terms(
    model: EquivariantAutoencoder, mol: Molecule, z: Molecule, mask: NodeMask
) -> dict[str, Float[Array, ""]]:
    """Per-molecule reconstruction: squared position error, type cross-entropy (sums over real atoms), type
    accuracy and position RMSD (Angstrom for EDM's position normalisation 1)."""
    x_rec, logits = model.decode_logits(z, mask)
    types = model.types_of(mol)
    m = mask.astype(jnp.float32)
    sq_x = jnp.sum(jnp.where(mask[:, None], (x_rec - mol.positions) ** 2, 0.0))
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, types[:, None], axis=-1)[:, 0]
    n = n_real(mask)
    return {
        "sq_x": sq_x,
        "ce": jnp.sum(ce * m),
        "type_accuracy": jnp.sum((jnp.argmax(logits, -1) == types) * m) / n,
        "rmsd": jnp.sqrt(sq_x / n),
    }


class AutoencoderLoss(AbstractObjective):
    """GeoLDM's autoencoder loss with a small KL term (module docstring); `model` is an
    `EquivariantAutoencoder`."""

    kl_weight: float = eqx.field(static=True, default=0.01)

    def loss_one(self, model, mol: Molecule, mask: NodeMask, *, key: Key, step: IntScalar, target=None):
        mu = model.encode(mol, mask)
        z = mu + model.posterior_std * com_free_normal(key, mask, model.latent_channels, mu.positions.dtype)
        terms = reconstruction_terms(model, mol, z, mask)
        n = n_real(mask)
        dim_x = (n - 1.0) * 3.0 + n * model.info.n_types
        dim_z = (n - 1.0) * 3.0 + n * model.latent_channels
        kl = gaussian_kl_to_standard(mu, model.posterior_std, mask)
        recon = (terms["sq_x"] + terms["ce"]) / dim_x
        loss = recon + self.kl_weight * kl / dim_z
        return loss, {"recon": recon, "kl": kl / dim_z, "type_accuracy": terms["type_accuracy"], "rmsd": terms["rmsd"]}
