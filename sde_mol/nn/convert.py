"""Conversion of EDM (PyTorch) state dicts into `EGNN`.

The EDM state dict stores every `nn.Linear` as weight (out, in) and bias (out,), which is exactly the layout of
`eqx.nn.Linear`, so the conversion copies tensors; the only reshaping is stacking the `n_layers` blocks along a
leading axis (the EGNN runs its blocks with `lax.scan`). Key names (prefix `dynamics.egnn.` in a full EDM model):

    embedding.{weight,bias}                       -> EGNN.embedding
    embedding_out.{weight,bias}                   -> EGNN.embedding_out
    e_block_{l}.gcl_{s}.edge_mlp.{0,2}.*          -> EGNN.blocks.gcls[s].edge_mlp_{0,2}   (layer l of the stack)
    e_block_{l}.gcl_{s}.node_mlp.{0,2}.*          -> EGNN.blocks.gcls[s].node_mlp_{0,2}
    e_block_{l}.gcl_{s}.att_mlp.0.*               -> EGNN.blocks.gcls[s].att_mlp_0
    e_block_{l}.gcl_equiv.coord_mlp.{0,2,4}.*     -> EGNN.blocks.equiv.coord_mlp_{0,2,4}
"""

from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .egnn import EGNN

_ANCHOR = "embedding.weight"


def egnn_config_from_edm(edm: Mapping) -> dict:
    """Map EDM's argument names (as in its args / the parity fixture's `config_json`) to `EGNN` keyword
    arguments. Missing entries take the values of the released QM9 model."""
    n_feat = edm.get("in_node_nf", 6)
    return dict(
        n_feat=int(n_feat),
        hidden=int(edm.get("nf", 256)),
        n_layers=int(edm.get("n_layers", 9)),
        inv_sublayers=int(edm.get("inv_sublayers", 1)),
        attention=bool(edm.get("attention", True)),
        tanh=bool(edm.get("tanh", True)),
        coords_range=float(edm.get("coords_range", 15.0)),
        norm_constant=float(edm.get("norm_constant", 1.0)),
        normalization_factor=float(edm.get("normalization_factor", 1.0)),
        aggregation=str(edm.get("aggregation_method", "sum")),
        condition_time=bool(edm.get("condition_time", True)),
    )


def _find_prefix(params: Mapping[str, np.ndarray]) -> str:
    """The key prefix in front of the EGNN's own names (`dynamics.egnn.` for a full EDM model)."""
    hits = [k for k in params if k == _ANCHOR or k.endswith("." + _ANCHOR)]
    if len(hits) != 1:
        raise ValueError(f"expected exactly one '*{_ANCHOR}' key in the state dict, found {hits}")
    return hits[0][: -len(_ANCHOR)]


def egnn_from_state_dict(
    params: Mapping[str, np.ndarray], config: Mapping, *, dtype=jnp.float32, strict: bool = True
) -> EGNN:
    """Build an `EGNN` (keyword arguments `config`, see `EGNN.config`) holding the weights of an EDM state dict.

    `params` maps EDM names to arrays (torch tensors converted with `.numpy()`); any prefix such as
    `dynamics.egnn.` or `module.dynamics.egnn.` is detected. With `strict`, EGNN tensors in `params` that the
    model does not use are an error (a sign of a config mismatch). Shapes are checked against the model.
    """
    cfg = dict(config)
    skeleton = eqx.filter_eval_shape(lambda: EGNN(**cfg, key=jr.key(0), dtype=dtype))
    prefix = _find_prefix(params)
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        key = prefix + name
        if key not in params:
            raise ValueError(f"state dict has no tensor {key!r} (config {cfg})")
        used.add(key)
        return np.asarray(params[key])

    def stacked(name: str) -> np.ndarray:
        return np.stack([get(f"e_block_{layer}.{name}") for layer in range(skeleton.n_layers)])

    targets, values = [], []

    def put(leaf_of, value):
        targets.append(leaf_of)
        values.append(value)

    for end in ("", "_out"):
        for p in ("weight", "bias"):
            put(lambda m, e=end, p=p: getattr(getattr(m, "embedding" + e), p), get(f"embedding{end}.{p}"))
    for s in range(skeleton.inv_sublayers):
        names = ["edge_mlp_0", "edge_mlp_2", "node_mlp_0", "node_mlp_2"]
        names += ["att_mlp_0"] if skeleton.attention else []
        for field in names:
            torch_name = field[:-2] + "." + field[-1]
            for p in ("weight", "bias"):
                put(
                    lambda m, s=s, f=field, p=p: getattr(getattr(m.blocks.gcls[s], f), p),
                    stacked(f"gcl_{s}.{torch_name}.{p}"),
                )
    for field, params_of in (("coord_mlp_0", "wb"), ("coord_mlp_2", "wb"), ("coord_mlp_4", "w")):
        torch_name = field[:-2] + "." + field[-1]
        for p in ("weight", "bias")[: len(params_of)]:
            put(
                lambda m, f=field, p=p: getattr(getattr(m.blocks.equiv, f), p),
                stacked(f"gcl_equiv.{torch_name}.{p}"),
            )

    egnn_keys = {k for k in params if k.startswith(prefix)}
    if strict and egnn_keys - used:
        raise ValueError(f"state dict tensors not used by EGNN({cfg}): {sorted(egnn_keys - used)}")
    for leaf_of, value in zip(targets, values, strict=True):
        expected = leaf_of(skeleton)
        if tuple(value.shape) != tuple(expected.shape):
            raise ValueError(f"shape {value.shape} in the state dict, the model expects {expected.shape}")
    n_model_leaves = len(jax.tree_util.tree_leaves(skeleton))
    if n_model_leaves != len(targets):
        raise ValueError(f"converted {len(targets)} tensors but the model has {n_model_leaves} arrays")
    arrays = [jnp.asarray(v, dtype=dtype) for v in values]
    return eqx.tree_at(lambda m: [f(m) for f in targets], skeleton, arrays)
