import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from sde_mol.molecule import random_orthogonal
from sde_mol.nn import EGNN, MLPNet, egnn_config_from_edm, egnn_from_state_dict
from sde_mol.nn.egnn import edge_first_layer


def _params(fx):
    return {k[len("param/") :]: v for k, v in fx.items() if k.startswith("param/")}


def _config(fx):
    return egnn_config_from_edm(json.loads(str(fx["config_json"])))


@pytest.fixture(scope="module")
def net(fixture_npz):
    return egnn_from_state_dict(_params(fixture_npz), _config(fixture_npz))


@pytest.fixture(scope="module")
def inputs(fixture_npz):
    xh = jnp.asarray(fixture_npz["phi_in_xh"])
    mask = jnp.asarray(fixture_npz["node_mask"][..., 0] > 0)
    return xh[..., :3], xh[..., 3:], mask, jnp.asarray(fixture_npz["phi_in_t"])


@eqx.filter_jit
def _batched(net, x, h, mask, t):
    return jax.vmap(net)(x, h, mask, t)


@eqx.filter_jit
def _single(net, x, h, mask, t):
    return net(x, h, mask, t)


@eqx.filter_jit
def _batched_intermediates(net, x, h, mask, t):
    return jax.vmap(net.intermediates)(x, h, mask, t)


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_config_from_fixture(fixture_npz, net):
    assert net.config() == dict(
        n_feat=6,
        hidden=32,
        n_layers=3,
        inv_sublayers=1,
        attention=True,
        tanh=True,
        coords_range=15.0,
        norm_constant=1.0,
        normalization_factor=1.0,
        aggregation="sum",
        condition_time=True,
    )


def test_parity_phi_out_and_intermediates(fixture_npz, net, inputs):
    with jax.default_matmul_precision("highest"):
        out = _batched_intermediates(net, *inputs)
    eps_hat = np.concatenate([out["dx"], out["h_out"]], axis=-1)
    errors = {"phi_out": _max_err(eps_hat, fixture_npz["phi_out"])}
    for name in ("embedding_in", "embedding_h", "egnn_h_out", "egnn_x_out"):
        errors[name] = _max_err(out[name], fixture_npz[f"phi_dbg_{name}"])
    for layer in range(net.n_layers):
        errors[f"block{layer}_h"] = _max_err(out["block_h"][:, layer], fixture_npz[f"phi_dbg_block{layer}_h"])
        errors[f"block{layer}_x"] = _max_err(out["block_x"][:, layer], fixture_npz[f"phi_dbg_block{layer}_x"])
    print("EGNN parity max abs errors:", json.dumps(errors))
    assert max(errors.values()) < 1e-5, errors
    # the plain call equals the debug path
    dx, h = _batched(net, *inputs)
    np.testing.assert_allclose(dx, out["dx"], atol=1e-6)
    np.testing.assert_allclose(h, out["h_out"], atol=1e-6)


def test_parity_phi_out_float64(fixture_npz):
    with jax.enable_x64(True):
        net64 = egnn_from_state_dict(_params(fixture_npz), _config(fixture_npz), dtype=jnp.float64)
        xh = jnp.asarray(fixture_npz["phi_in_xh"], jnp.float64)
        mask = jnp.asarray(fixture_npz["node_mask"][..., 0] > 0)
        t = jnp.asarray(fixture_npz["phi_in_t"], jnp.float64)
        dx, h = jax.vmap(net64)(xh[..., :3], xh[..., 3:], mask, t)
        assert dx.dtype == jnp.float64
        err = _max_err(np.concatenate([dx, h], -1), fixture_npz["phi_out_f64"])
    print("EGNN float64 parity max abs error:", err)
    assert err < 1e-9


@pytest.mark.parametrize("seed", [0, 1])
def test_equivariance(net, inputs, seed):
    x, h, mask, t = inputs
    k_rot, k_shift = jr.split(jr.key(seed))
    rot = random_orthogonal(k_rot, reflect=True)
    shift = 3.0 * jr.normal(k_shift, (3,))
    x_moved = jnp.where(mask[..., None], x @ rot.T + shift, 0.0)
    dx, h_out = _batched(net, x, h, mask, t)
    dx_m, h_m = _batched(net, x_moved, h, mask, t)
    scale = float(jnp.max(jnp.abs(dx)))
    assert scale > 1e-2  # the test is not vacuous
    np.testing.assert_allclose(dx_m, dx @ rot.T, atol=2e-5 * max(scale, 1.0))
    np.testing.assert_allclose(h_m, h_out, atol=2e-5)
    for out in (dx, dx_m):
        np.testing.assert_allclose(jnp.sum(out, axis=1), 0.0, atol=1e-5)  # CoM-free (padding is zero)
        assert np.all(np.asarray(out)[~np.asarray(mask)] == 0.0)
    assert np.all(np.asarray(h_m)[~np.asarray(mask)] == 0.0)


def test_padding_slots_do_not_matter(net, inputs):
    x, h, mask, t = inputs
    pad = ~mask[..., None]
    k1, k2 = jr.split(jr.key(3))
    x_junk = jnp.where(pad, 100.0 * jr.normal(k1, x.shape), x)
    h_junk = jnp.where(pad, jnp.nan, h)  # even NaN in a padded slot never reaches real atoms
    dx, h_out = _batched(net, x, h, mask, t)
    dx_j, h_j = _batched(net, x_junk, h_junk, mask, t)
    np.testing.assert_array_equal(dx_j, dx)
    np.testing.assert_array_equal(h_j, h_out)
    # more padded slots: same outputs on the real atoms
    n_extra = 5
    widen = lambda a: jnp.pad(a, ((0, 0), (0, n_extra)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
    dx_w, h_w = _batched(net, widen(x), widen(h), widen(mask), t)
    np.testing.assert_allclose(dx_w[:, :-n_extra], dx, atol=1e-6)
    np.testing.assert_allclose(h_w[:, :-n_extra], h_out, atol=1e-6)
    assert np.all(np.asarray(dx_w[:, -n_extra:]) == 0.0)


def test_nan_in_real_atom_propagates(net, inputs):
    x, h, mask, t = inputs
    dx, _ = _single(net, x[0].at[0, 0].set(jnp.nan), h[0], mask[0], t[0])
    assert np.isnan(np.asarray(dx)[np.asarray(mask[0])]).all()  # never silently zeroed


def test_vmap_equals_single_calls(net, inputs):
    dx, h_out = _batched(net, *inputs)
    for b in range(dx.shape[0]):
        dx_b, h_b = _single(net, *(a[b] for a in inputs))
        np.testing.assert_allclose(dx_b, dx[b], atol=1e-6)
        np.testing.assert_allclose(h_b, h_out[b], atol=1e-6)


def test_factorised_first_layer_equals_concatenation():
    n, nf, out = 7, 5, 4
    k = jr.split(jr.key(0), 4)
    layer = eqx.nn.Linear(2 * nf + 2, out, key=k[0])
    h = jr.normal(k[1], (n, nf))
    d = jr.uniform(k[2], (n, n))
    d0 = jr.uniform(k[3], (n, n))
    explicit = jnp.concatenate(
        [
            jnp.broadcast_to(h[:, None, :], (n, n, nf)),
            jnp.broadcast_to(h[None, :, :], (n, n, nf)),
            d[..., None],
            d0[..., None],
        ],
        axis=-1,
    )
    expected = jax.vmap(jax.vmap(layer))(explicit)
    np.testing.assert_allclose(edge_first_layer(layer, h, d, d0), expected, atol=1e-5)


def test_initialisation_matches_pytorch_defaults():
    hidden = 16
    net = EGNN(6, hidden, 2, key=jr.key(0))
    gcl, equiv = net.blocks.gcls[0], net.blocks.equiv
    for layer, fan_in in (
        (net.embedding, 7),
        (net.embedding_out, hidden),
        (gcl.edge_mlp_0, 2 * hidden + 2),
        (gcl.node_mlp_0, 2 * hidden),
        (gcl.att_mlp_0, hidden),
        (equiv.coord_mlp_2, hidden),
    ):
        bound = 1.0 / math.sqrt(fan_in)
        w = np.asarray(layer.weight)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
        assert np.abs(np.asarray(layer.bias)).max() <= bound
    head = equiv.coord_mlp_4
    assert head.bias is None and head.weight.shape == (2, 1, hidden)
    bound = 0.001 * math.sqrt(6.0 / (hidden + 1))
    assert bound * 0.8 < np.abs(np.asarray(head.weight)).max() <= bound
    # the stacked blocks are independent draws
    assert not np.allclose(gcl.edge_mlp_2.weight[0], gcl.edge_mlp_2.weight[1])


def _random_batch(key, n_mol=3, n=10, n_feat=6):
    k = jr.split(key, 3)
    mask = jnp.arange(n)[None] < jnp.array([[4], [7], [10]])[:n_mol]
    x = jnp.where(mask[..., None], jr.normal(k[0], (n_mol, n, 3)), 0.0)
    h = jnp.where(mask[..., None], jr.normal(k[1], (n_mol, n, n_feat)), 0.0)
    return x, h, mask, jr.uniform(k[2], (n_mol,))


def _rotated_and_widened(net, x, h, mask, t, rot, n_extra=3):
    """Outputs for the batch, its rotated copy and its copy with extra padding, in ONE compiled call."""
    widen = lambda a: jnp.pad(a, ((0, 0), (0, n_extra)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
    n_mol = x.shape[0]
    dx, h_out = _batched(
        net,
        jnp.concatenate([widen(x), widen(x @ rot.T)]),
        jnp.concatenate([widen(h), widen(h)]),
        jnp.concatenate([widen(mask), widen(mask)]),
        jnp.concatenate([t, t]),
    )
    return dx[:n_mol], h_out[:n_mol], dx[n_mol:], h_out[n_mol:]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(aggregation="mean"),
        dict(attention=False, tanh=False, inv_sublayers=2, condition_time=False, normalization_factor=4.0),
    ],
)
def test_mean_aggregation_and_options_run(kwargs):
    x, h, mask, t = _random_batch(jr.key(1))
    rot = random_orthogonal(jr.key(2))
    net = EGNN(6, 16, 2, key=jr.key(0), **kwargs)
    dx_w, h_w, dx_r, h_r = _rotated_and_widened(net, x, h, mask, t, rot)
    dx, h_out = _batched(net, x, h, mask, t)
    assert np.isfinite(np.asarray(dx)).all() and np.isfinite(np.asarray(h_out)).all()
    # padding-independent (the reference's "mean" is not: it divides by the padded width)
    np.testing.assert_allclose(dx_w[:, :-3], dx, atol=1e-6)
    np.testing.assert_allclose(h_w[:, :-3], h_out, atol=1e-6)
    np.testing.assert_allclose(dx_r[:, :-3], dx @ rot.T, atol=1e-5)
    np.testing.assert_allclose(h_r[:, :-3], h_out, atol=1e-5)


def test_bad_aggregation_name():
    with pytest.raises(ValueError, match="aggregation"):
        EGNN(6, 16, 2, key=jr.key(0), aggregation="max")


def test_no_retrace_for_new_values():
    net = EGNN(6, 16, 2, key=jr.key(0))

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def f(net, x, h, mask, t):
        return jax.vmap(net)(x, h, mask, t)

    for seed in range(3):
        f(net, *_random_batch(jr.key(seed)))


def test_mlpnet_com_free_and_masked():
    x, h, mask, t = _random_batch(jr.key(4))
    net = MLPNet(10, 6, 32, 2, key=jr.key(0))
    dx, h_out = _batched(net, x, h, mask, t)
    assert dx.shape == x.shape and h_out.shape == h.shape
    np.testing.assert_allclose(jnp.sum(dx, axis=1), 0.0, atol=1e-5)
    assert np.all(np.asarray(dx)[~np.asarray(mask)] == 0.0)
    assert np.all(np.asarray(h_out)[~np.asarray(mask)] == 0.0)
    # t matters (a time-conditioned student)
    dx2, _ = _batched(net, x, h, mask, t + 0.5)
    assert not np.allclose(dx, dx2)


def test_conversion_rejects_mismatched_config(fixture_npz):
    params, cfg = _params(fixture_npz), _config(fixture_npz)
    with pytest.raises(ValueError, match="not used"):
        egnn_from_state_dict(params, dict(cfg, n_layers=2))
    with pytest.raises(ValueError, match="no tensor"):
        egnn_from_state_dict(params, dict(cfg, n_layers=4))
    with pytest.raises(ValueError, match="shape"):
        egnn_from_state_dict(params, dict(cfg, hidden=16))


def test_shapes_are_checked(net, inputs):
    x, h, mask, t = inputs
    with pytest.raises(TypeCheckError):  # n_atoms of x and mask disagree
        net(x[0], h[0], mask[0, :-1], t[0])
