"""The E(n)-equivariant graph network of EDM (Hoogeboom et al. 2022), for ONE padded molecule.

A molecule is a dense set of `n_atoms` slots; `mask` marks the real atoms. Every real atom talks to every
other real atom (no self loops): the edge mask is `mask_i & mask_j & (i != j)`. Callers `vmap` over a batch.

Forward pass (notation of the paper, x positions, h invariant features, t the diffusion time):

    x0 = x * mask,  h = [h * mask | t]               (t appended raw, to padded slots too)
    h  = embedding(h),  d0_ij = |x0_i - x0_j|^2
    per block:  d_ij = |x_i - x_j|^2,  u_ij = (x_i - x_j) / (sqrt(d_ij + 1e-8) + norm_constant)
                a_ij = [d_ij, d0_ij]
                GCL (x inv_sublayers):
                    m_ij  = SiLU(L2 SiLU(L1 [h_i, h_j, a_ij]))
                    g_ij  = sigmoid(L_att m_ij)                                   (if attention)
                    agg_i = sum_j m_ij g_ij e_ij / normalization_factor          (or / #neighbours: mean)
                    h_i   = (h_i + L4 SiLU(L3 [h_i, agg_i])) * mask_i
                coordinate update with the new h and the block's u, a:
                    c_ij = C3 SiLU(C2 SiLU(C1 [h_i, h_j, a_ij]))                  (C3 without bias)
                    x_i  = (x_i + sum_j u_ij tanh(c_ij) coords_range e_ij / normalization_factor) * mask_i
                h = h * mask
    h_out = embedding_out(h) * mask, first n_feat columns (the time column is dropped)
    dx    = CoM-free((x_final - x0) * mask)

The first layer of both edge MLPs (L1 and C1, 2*hidden + 2 inputs) is evaluated in factorised form,
`W_i h_i + W_j h_j + w_d d_ij + w_d0 d0_ij + b`: two (n_atoms, hidden) @ (hidden, hidden) products broadcast
to (n_atoms, n_atoms, hidden), instead of materialising [h_i, h_j, a_ij] for every edge.

Weights are stored in PyTorch layout (`eqx.nn.Linear`: weight (out, in), bias (out,)), under the names of the
EDM state dict (`edge_mlp_0` is `gcl_0.edge_mlp.0`, ...), so converting a reference checkpoint is a copy.
The `n_layers` blocks are stacked along a leading axis (one pytree, one block class) and run with
`jax.lax.scan(..., unroll=True)`, i.e. traced once but compiled as straight-line code: on CPU it compiles more
slowly than a rolled scan but runs faster, as fast as a Python loop over blocks (experiments/NOTES.md, "EGNN
speed on CPU"). Run time wins; `_SCAN_UNROLL = 1` gives the rolled variant.

Differences from the reference, on purpose:
* NaN is never repaired. EDM replaces the position output of the WHOLE batch by zeros if any entry is NaN;
  here a NaN in a real atom propagates to the output, so it is visible.
* Padded slots are cleared by selection (`jnp.where`) on entry, so whatever a caller leaves there (even NaN or
  inf) cannot reach the real atoms.
* `aggregation="mean"` divides by the number of real neighbours of atom i (M - 1). The reference divides by
  the number of enumerated edges, which for its dense batches is the padded width N, so its "mean" depends
  on padding. The QM9 model uses "sum", where both agree.

Precision: the network computes in the dtype of its weights, with one exception. Let `compute` be the
weights' dtype and `geometry = promote(compute, float32)`. Positions, distances, the unit vectors u_ij, the
coordinate aggregation, the time input and the input/output embeddings run in `geometry`; the hidden features
and the (n_atoms, n_atoms, hidden) edge messages, where the work is, run in `compute`. For float32 or float64
weights both are the same dtype and every cast is a no-op. Mixed precision (`train.make_step(compute_dtype=
jnp.bfloat16)`) casts the weights to bfloat16 for the forward pass only, so the matrix work runs in bfloat16
while coordinates and time keep float32 resolution and the master weights, gradients, optimiser and EMA stay
float32.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from ..molecule import remove_com
from ..typing import Features, Key, NodeMask, Positions

_EPS_NORM = 1e-8  # inside sqrt(d_ij + eps), as in the reference
_SCAN_UNROLL = True  # see the module docstring: unrolled blocks run faster on CPU


def _dense(layer: eqx.nn.Linear, x: Float[Array, "*rest d_in"], dtype=None) -> Float[Array, "*rest d_out"]:
    """`x W^T + b` over the last axis for any number of leading axes (one XLA dot), computed in `dtype`
    (default: the layer's weight dtype; the input is cast to it)."""
    dtype = layer.weight.dtype if dtype is None else dtype
    y = x.astype(dtype) @ layer.weight.astype(dtype).T
    return y if layer.bias is None else y + layer.bias.astype(dtype)


def _linear(d_in: int, d_out: int, key: Key, dtype, use_bias: bool = True) -> eqx.nn.Linear:
    """PyTorch `nn.Linear` default init: weight and bias ~ U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    return eqx.nn.Linear(d_in, d_out, use_bias=use_bias, key=key, dtype=dtype)


def _xavier_linear(d_in: int, d_out: int, gain: float, key: Key, dtype) -> eqx.nn.Linear:
    """Bias-free linear layer, weight ~ Xavier-uniform with the given gain."""
    layer = eqx.nn.Linear(d_in, d_out, use_bias=False, key=key, dtype=dtype)  # its weight is replaced
    bound = gain * math.sqrt(6.0 / (d_in + d_out))
    weight = jr.uniform(key, (d_out, d_in), dtype, minval=-bound, maxval=bound)
    return eqx.tree_at(lambda lin: lin.weight, layer, weight)


def edge_first_layer(
    layer: eqx.nn.Linear,
    h: Float[Array, "n_atoms hidden"],
    d: Float[Array, "n_atoms n_atoms"],
    d0: Float[Array, "n_atoms n_atoms"],
) -> Float[Array, "n_atoms n_atoms hidden_out"]:
    """`layer([h_i, h_j, d_ij, d0_ij])` for all pairs (i, j), factorised: the (2*hidden + 2)-wide input of
    every edge is never built. Column order of `layer.weight` is EDM's: [h_i | h_j | d_ij | d0_ij].
    Computed in the weights' dtype (the distances are cast to it)."""
    nf = h.shape[-1]
    w = layer.weight
    receiver = h @ w[:, :nf].T + layer.bias  # (N, out), indexed by i
    sender = h @ w[:, nf : 2 * nf].T  # (N, out), indexed by j
    # the two distance columns as one K = 2 product: written as broadcast multiplies, XLA materialises each
    # (N, N, out) broadcast weight for the backward pass (its cost: experiments/NOTES.md, "EGNN speed on CPU")
    geometry = jnp.stack([d, d0], axis=-1).astype(w.dtype) @ w[:, 2 * nf : 2 * nf + 2].T
    return receiver[:, None, :] + sender[None, :, :] + geometry


def _sigmoid(x: Array) -> Array:
    """sigmoid(x) = (1 + tanh(x / 2)) / 2: the same function; XLA's CPU tanh is cheaper than its exp and divide
    on the (n_atoms, n_atoms, hidden) edge tensors (experiments/NOTES.md, "EGNN speed on CPU")."""
    return 0.5 + 0.5 * jnp.tanh(0.5 * x)


def _silu(x: Array) -> Array:
    """SiLU x * sigmoid(x), by `_sigmoid`."""
    return x * _sigmoid(x)


def _aggregate(
    values: Float[Array, "n_atoms n_atoms c"],
    weights: Float[Array, "n_atoms n_atoms"],
    scale: Float[Array, "n_atoms 1"],
) -> Float[Array, "n_atoms c"]:
    """sum_j values_ij * weights_ij, times a per-receiver scale (1/normalization_factor or 1/#neighbours)."""
    return jnp.einsum("ijc,ij->ic", values, weights) * scale


class GCL(eqx.Module):
    """Invariant message-passing layer (EDM `GCL`): edge MLP, optional sigmoid attention gate, residual node
    MLP. Called with the block's edge attributes; returns the new (masked) node features."""

    edge_mlp_0: eqx.nn.Linear
    edge_mlp_2: eqx.nn.Linear
    node_mlp_0: eqx.nn.Linear
    node_mlp_2: eqx.nn.Linear
    att_mlp_0: eqx.nn.Linear | None

    def __init__(self, hidden: int, *, attention: bool, key: Key, dtype=jnp.float32):
        k = jr.split(key, 5)
        self.edge_mlp_0 = _linear(2 * hidden + 2, hidden, k[0], dtype)
        self.edge_mlp_2 = _linear(hidden, hidden, k[1], dtype)
        self.node_mlp_0 = _linear(2 * hidden, hidden, k[2], dtype)
        self.node_mlp_2 = _linear(hidden, hidden, k[3], dtype)
        self.att_mlp_0 = _linear(hidden, 1, k[4], dtype) if attention else None

    def __call__(
        self,
        h: Float[Array, "n_atoms hidden"],
        d: Float[Array, "n_atoms n_atoms"],
        d0: Float[Array, "n_atoms n_atoms"],
        edge: Float[Array, "n_atoms n_atoms"],
        agg_scale: Float[Array, "n_atoms 1"],
        node: Float[Array, "n_atoms 1"],
    ) -> Float[Array, "n_atoms hidden"]:
        dtype = self.edge_mlp_2.weight.dtype  # compute dtype; masks and scales arrive in the geometry dtype
        edge, agg_scale, node = edge.astype(dtype), agg_scale.astype(dtype), node.astype(dtype)
        m = _silu(edge_first_layer(self.edge_mlp_0, h, d, d0))
        m = _silu(_dense(self.edge_mlp_2, m))
        if self.att_mlp_0 is None:
            gate = edge
        else:
            gate = _sigmoid(m @ self.att_mlp_0.weight[0] + self.att_mlp_0.bias[0]) * edge
        agg = _aggregate(m, gate, agg_scale)
        update = _dense(self.node_mlp_2, _silu(_dense(self.node_mlp_0, jnp.concatenate([h, agg], -1))))
        return (h + update) * node


class EquivariantUpdate(eqx.Module):
    """Coordinate update (EDM `EquivariantUpdate`): x_i += sum_j u_ij * phi(h_i, h_j, a_ij) * e_ij, with
    phi = tanh(MLP) * coords_range (or the raw MLP output when tanh is off)."""

    coord_mlp_0: eqx.nn.Linear
    coord_mlp_2: eqx.nn.Linear
    coord_mlp_4: eqx.nn.Linear
    tanh: bool = eqx.field(static=True)
    coords_range: float = eqx.field(static=True)

    def __init__(self, hidden: int, *, tanh: bool, coords_range: float, key: Key, dtype=jnp.float32):
        k = jr.split(key, 3)
        self.coord_mlp_0 = _linear(2 * hidden + 2, hidden, k[0], dtype)
        self.coord_mlp_2 = _linear(hidden, hidden, k[1], dtype)
        self.coord_mlp_4 = _xavier_linear(hidden, 1, 0.001, k[2], dtype)
        self.tanh = bool(tanh)
        self.coords_range = float(coords_range)

    def __call__(
        self,
        h: Float[Array, "n_atoms hidden"],
        x: Float[Array, "n_atoms 3"],
        u: Float[Array, "n_atoms n_atoms 3"],
        d: Float[Array, "n_atoms n_atoms"],
        d0: Float[Array, "n_atoms n_atoms"],
        edge: Float[Array, "n_atoms n_atoms"],
        agg_scale: Float[Array, "n_atoms 1"],
        node: Float[Array, "n_atoms 1"],
    ) -> Float[Array, "n_atoms 3"]:
        c = _silu(edge_first_layer(self.coord_mlp_0, h, d, d0))
        c = _silu(_dense(self.coord_mlp_2, c))
        phi = (c @ self.coord_mlp_4.weight[0]).astype(x.dtype)  # (N, N); coordinates in the geometry dtype
        if self.tanh:
            phi = jnp.tanh(phi) * self.coords_range
        return (x + _aggregate(u, phi * edge, agg_scale)) * node


class EquivariantBlock(eqx.Module):
    """One EDM `EquivariantBlock`: geometry from the current x, `inv_sublayers` GCLs, one coordinate update."""

    gcls: tuple[GCL, ...]
    equiv: EquivariantUpdate
    norm_constant: float = eqx.field(static=True)

    def __init__(
        self,
        hidden: int,
        *,
        inv_sublayers: int,
        attention: bool,
        tanh: bool,
        coords_range: float,
        norm_constant: float,
        key: Key,
        dtype=jnp.float32,
    ):
        keys = jr.split(key, inv_sublayers + 1)
        self.gcls = tuple(GCL(hidden, attention=attention, key=k, dtype=dtype) for k in keys[:-1])
        self.equiv = EquivariantUpdate(hidden, tanh=tanh, coords_range=coords_range, key=keys[-1], dtype=dtype)
        self.norm_constant = float(norm_constant)

    def __call__(
        self,
        h: Float[Array, "n_atoms hidden"],
        x: Float[Array, "n_atoms 3"],
        d0: Float[Array, "n_atoms n_atoms"],
        edge: Float[Array, "n_atoms n_atoms"],
        agg_scale: Float[Array, "n_atoms 1"],
        node: Float[Array, "n_atoms 1"],
    ) -> tuple[Float[Array, "n_atoms hidden"], Float[Array, "n_atoms 3"]]:
        diff = x[:, None, :] - x[None, :, :]
        d = jnp.sum(diff**2, axis=-1)
        u = diff / (jnp.sqrt(d + _EPS_NORM) + self.norm_constant)[..., None]
        for gcl in self.gcls:
            h = gcl(h, d, d0, edge, agg_scale, node)
        x = self.equiv(h, x, u, d, d0, edge, agg_scale, node)
        return h * node.astype(h.dtype), x


class EGNN(eqx.Module):
    """EDM's EGNN dynamics for one padded molecule: `(x, h, mask, t) -> (dx, h_out)`.

    `dx` is (x_final - x) on the real atoms, CoM-free, zero on padding (EDM's "vel"); `h_out` the first
    `n_feat` columns of the output embedding, zero on padding. No scaling by alpha/sigma happens here: that is
    the denoiser wrapper's job. See the module docstring for the maths and the deliberate differences from
    the reference (NaN handling, padding, mean aggregation).
    """

    embedding: eqx.nn.Linear
    blocks: EquivariantBlock  # stacked: every array leaf has a leading axis of length n_layers
    embedding_out: eqx.nn.Linear
    n_feat: int = eqx.field(static=True)
    hidden: int = eqx.field(static=True)
    n_layers: int = eqx.field(static=True)
    inv_sublayers: int = eqx.field(static=True)
    attention: bool = eqx.field(static=True)
    tanh: bool = eqx.field(static=True)
    coords_range: float = eqx.field(static=True)
    norm_constant: float = eqx.field(static=True)
    normalization_factor: float = eqx.field(static=True)
    mean_aggregation: bool = eqx.field(static=True)
    condition_time: bool = eqx.field(static=True)

    def __init__(
        self,
        n_feat: int,
        hidden: int,
        n_layers: int,
        *,
        key: Key,
        inv_sublayers: int = 1,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
        norm_constant: float = 1.0,
        normalization_factor: float = 1.0,
        aggregation: str = "sum",
        condition_time: bool = True,
        dtype=jnp.float32,
    ):
        if aggregation not in ("sum", "mean"):
            raise ValueError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")
        if n_layers < 1 or inv_sublayers < 1:
            raise ValueError("n_layers and inv_sublayers must be >= 1")
        k_in, k_blocks, k_out = jr.split(key, 3)
        n_in = n_feat + (1 if condition_time else 0)
        self.embedding = _linear(n_in, hidden, k_in, dtype)
        self.embedding_out = _linear(hidden, n_in, k_out, dtype)

        def make_block(k):
            return EquivariantBlock(
                hidden,
                inv_sublayers=inv_sublayers,
                attention=attention,
                tanh=tanh,
                coords_range=coords_range,
                norm_constant=norm_constant,
                key=k,
                dtype=dtype,
            )

        self.blocks = eqx.filter_vmap(make_block)(jr.split(k_blocks, n_layers))
        self.n_feat = int(n_feat)
        self.hidden = int(hidden)
        self.n_layers = int(n_layers)
        self.inv_sublayers = int(inv_sublayers)
        self.attention = bool(attention)
        self.tanh = bool(tanh)
        self.coords_range = float(coords_range)
        self.norm_constant = float(norm_constant)
        self.normalization_factor = float(normalization_factor)
        self.mean_aggregation = aggregation == "mean"
        self.condition_time = bool(condition_time)

    def config(self) -> dict:
        """JSON-able constructor arguments (without key and dtype): `EGNN(**model.config(), key=...)`
        rebuilds the same skeleton."""
        return dict(
            n_feat=self.n_feat,
            hidden=self.hidden,
            n_layers=self.n_layers,
            inv_sublayers=self.inv_sublayers,
            attention=self.attention,
            tanh=self.tanh,
            coords_range=self.coords_range,
            norm_constant=self.norm_constant,
            normalization_factor=self.normalization_factor,
            aggregation="mean" if self.mean_aggregation else "sum",
            condition_time=self.condition_time,
        )

    def __call__(
        self,
        x: Positions,
        h: Features,
        mask: NodeMask,
        t: Float[Array, ""],
    ) -> tuple[Positions, Features]:
        out = self._forward(x, h, mask, t, collect=False)
        return out["dx"], out["h_out"]

    def intermediates(
        self,
        x: Positions,
        h: Features,
        mask: NodeMask,
        t: Float[Array, ""],
    ) -> dict[str, Array]:
        """Debug view of one forward pass (names follow the parity fixture's `phi_dbg_*` keys):
        `embedding_in` (n_atoms, n_feat+1), `embedding_h` (n_atoms, hidden), `block_h` (n_layers, n_atoms,
        hidden), `block_x` (n_layers, n_atoms, 3), `egnn_h_out` (n_atoms, n_feat+1), `egnn_x_out`
        (n_atoms, 3), and the outputs `dx`, `h_out`."""
        return self._forward(x, h, mask, t, collect=True)

    def _forward(self, x, h, mask, t, *, collect: bool) -> dict[str, Array]:
        compute = self.blocks.equiv.coord_mlp_2.weight.dtype
        dtype = jnp.promote_types(compute, jnp.float32)  # geometry dtype, see the module docstring
        n = mask.shape[0]
        node = mask[:, None].astype(dtype)
        x0 = jnp.where(mask[:, None], x, 0.0).astype(dtype)
        h_in = jnp.where(mask[:, None], h, 0.0).astype(dtype)
        if self.condition_time:
            h_in = jnp.concatenate([h_in, jnp.broadcast_to(jnp.asarray(t, dtype), (n, 1))], axis=-1)
        edge_b = mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool)
        edge = edge_b.astype(dtype)
        if self.mean_aggregation:
            agg_scale = 1.0 / jnp.maximum(jnp.sum(edge, axis=1, keepdims=True), 1.0)
        else:
            agg_scale = jnp.full((n, 1), 1.0 / self.normalization_factor, dtype)

        emb = _dense(self.embedding, h_in, dtype).astype(compute)
        d0 = jnp.sum((x0[:, None, :] - x0[None, :, :]) ** 2, axis=-1)
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def body(carry, block_params):
            block = eqx.combine(block_params, static)
            carry = block(*carry, d0, edge, agg_scale, node)
            return carry, (carry if collect else None)

        (hf, xf), per_block = jax.lax.scan(body, (emb, x0), params, unroll=_SCAN_UNROLL)
        h_final = _dense(self.embedding_out, hf, dtype) * node
        dx = remove_com((xf - x0) * node, mask)
        out = {"dx": dx, "h_out": h_final[:, : self.n_feat]}
        if collect:
            out.update(
                embedding_in=h_in,
                embedding_h=emb,
                block_h=per_block[0],
                block_x=per_block[1],
                egnn_h_out=h_final,
                egnn_x_out=xf,
            )
        return out


class _SiLU(eqx.Module):
    """jax.nn.silu as a leafless module: a raw function leaf would break `jax.lax.stop_gradient` over a whole
    model (the training step's target model, a consistency loss's boundary)."""

    def __call__(self, x: Array) -> Array:
        return jax.nn.silu(x)


class MLPNet(eqx.Module):
    """A plain MLP over the flattened padded molecule, with the same call signature as `EGNN`.

    Input: [x * mask (n_atoms*3) | h * mask (n_atoms*n_feat) | mask (n_atoms) | t]; output reshaped to
    (n_atoms, 3 + n_feat), positions made CoM-free and masked, features masked. NOT equivariant: it is a
    small student for tests against the exact (not rotation-invariant) oracle of a finite data set. Its
    activations (SiLU, identity at the output) are modules without leaves, so the whole model can be
    stop-gradiented as a target or boundary model.
    """

    mlp: eqx.nn.MLP
    n_atoms: int = eqx.field(static=True)
    n_feat: int = eqx.field(static=True)

    def __init__(self, n_atoms: int, n_feat: int, hidden: int, n_layers: int, *, key: Key, dtype=jnp.float32):
        n_in = n_atoms * (3 + n_feat) + n_atoms + 1
        self.mlp = eqx.nn.MLP(
            n_in,
            n_atoms * (3 + n_feat),
            hidden,
            n_layers,
            activation=_SiLU(),
            final_activation=eqx.nn.Identity(),
            key=key,
            dtype=dtype,
        )
        self.n_atoms = int(n_atoms)
        self.n_feat = int(n_feat)

    def __call__(
        self,
        x: Positions,
        h: Features,
        mask: NodeMask,
        t: Float[Array, ""],
    ) -> tuple[Positions, Features]:
        dtype = self.mlp.layers[0].weight.dtype
        m = mask[:, None]
        inputs = jnp.concatenate(
            [
                jnp.where(m, x, 0.0).reshape(-1),
                jnp.where(m, h, 0.0).reshape(-1),
                mask.astype(dtype),
                jnp.reshape(t, (1,)),
            ]
        ).astype(dtype)
        out = self.mlp(inputs).reshape(self.n_atoms, 3 + self.n_feat)
        return remove_com(out[:, :3], mask), out[:, 3:] * m.astype(dtype)
