"""Mixture-of-Experts: routing, balancing, dropless and capacity execution, expert parallelism.

References are written here from the definitions, in float64 numpy: every expert applied to
every token, weighted by the top-k gates (zero for the experts a token did not choose). Each
check runs for both expert activations: SwiGLU and Nemotron-H's ungated relu² (no w_gate).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from jaxlm.layers import MoE
from jaxlm.ops import moe as moe_ops
from numerics import F32_GRAD, F32_OUT, assert_close

N, D, F, E = 24, 8, 12, 8  # tokens, model width, expert width, experts


def normal(seed, shape, scale=1.0):
    # numpy draws: eager jax.random would compile anew for every shape.
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape, np.float32))


def expert_weights(seed, e=E, d=D, f=F, activation="swiglu"):
    """(w_gate, w_up, w_down), w_gate None for the ungated relu2 experts."""
    w_gate = normal(seed, (e, d, f), d**-0.5) if activation == "swiglu" else None
    return w_gate, normal(seed + 1, (e, d, f), d**-0.5), normal(seed + 2, (e, f, d), f**-0.5)


# ---------------------------------------------------------------- float64 references


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def np_route(logits, k, router, renormalize=False, bias=None):
    """(weights [N, k], experts [N, k]) straight from the definitions of the three routers."""
    logits = np.asarray(logits, np.float64)
    scores = {"softmax_topk": np_softmax(logits), "topk_softmax": logits, "sigmoid": 1 / (1 + np.exp(-logits))}[router]
    choice = scores if bias is None else scores + np.asarray(bias, np.float64)
    experts = np.argsort(-choice, axis=-1, kind="stable")[:, :k]  # ties: lower id first, as lax.top_k
    weights = np.take_along_axis(scores, experts, -1)
    if router == "topk_softmax":
        weights = np_softmax(weights)
    if renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, experts


def np_swiglu(x, wg, wu, wd):
    g = x @ wg
    return (g / (1 + np.exp(-g)) * (x @ wu)) @ wd


def np_relu2(x, wu, wd):
    return np.maximum(x @ wu, 0.0) ** 2 @ wd


def np_expert(x, wg, wu, wd):
    """One expert in float64: SwiGLU, or relu2 when wg is None."""
    f64 = lambda a: np.asarray(a, np.float64)
    return np_relu2(f64(x), f64(wu), f64(wd)) if wg is None else np_swiglu(f64(x), f64(wg), f64(wu), f64(wd))


def np_dense_moe(x, weights, experts, w_gate, w_up, w_down, keep=None):
    """Every expert on every token, summed with a dense [N, E] gate matrix."""
    x = np.asarray(x, np.float64)
    num_experts = w_up.shape[0]
    gates = np.zeros((x.shape[0], num_experts))
    kept = np.ones(experts.shape, bool) if keep is None else keep
    for n, j in np.ndindex(experts.shape):
        gates[n, experts[n, j]] += weights[n, j] * kept[n, j]
    outs = np.stack(
        [np_expert(x, None if w_gate is None else w_gate[e], w_up[e], w_down[e]) for e in range(num_experts)]
    )  # [E, N, D]
    return np.einsum("ne,end->nd", gates, outs)


def np_capacity_keep(experts, num_experts, capacity):
    """Slots in priority order: all first choices in token order, then all second choices, ..."""
    used = np.zeros(num_experts, int)
    keep = np.zeros(experts.shape, bool)
    for j in range(experts.shape[1]):
        for n in range(experts.shape[0]):
            e = experts[n, j]
            keep[n, j] = used[e] < capacity
            used[e] += 1
    return keep


def unit_scale(layer, seed):
    """Redraws every Param as normal / sqrt(fan-in): with the 0.02 init the outputs would be so
    small that assert_close's 1e-6 absolute pass would accept nearly anything."""
    params = nnx.state(layer, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    leaves = [normal(seed + i, p.shape, p.shape[-2] ** -0.5) for i, p in enumerate(leaves)]
    nnx.update(layer, jax.tree.unflatten(tree, leaves))
    return layer


def jax_expert(x, wg, wu, wd):
    """One expert in jax float32, from the formulas: SwiGLU, or relu2 when wg is None."""
    dot = lambda a, b: jnp.dot(a, b, precision="highest")
    h = jnp.maximum(dot(x, wu), 0.0) ** 2 if wg is None else jax.nn.silu(dot(x, wg)) * dot(x, wu)
    return dot(h, wd)


def jax_dense_moe(x, weights, experts, w_gate, w_up, w_down, keep=None):
    """The same dense reference in jax float32, for gradients; keep [N, k] masks dropped assignments."""
    gates = jax.nn.one_hot(experts, w_up.shape[0]) * weights[..., None]  # [N, k, E]
    if keep is not None:
        gates = gates * keep[..., None]
    outs = jax.vmap(jax_expert, in_axes=(None, 0, 0, 0))(x, w_gate, w_up, w_down)  # [E, N, D]
    return jnp.einsum("ne,end->nd", jnp.sum(gates, axis=1), outs, precision="highest")


def num_leaves(tree):
    return len(jax.tree.leaves(tree))


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize("router", moe_ops.ROUTERS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_matches_formula(router, renormalize):
    logits = normal(0, (N, E), 2.0)
    got = moe_ops.route(logits, 3, router=router, renormalize=renormalize)
    weights, experts = np_route(logits, 3, router, renormalize)
    np.testing.assert_array_equal(got.experts, experts)
    assert_close(got.weights, weights, F32_OUT, "weights")
    if renormalize or router == "topk_softmax":
        np.testing.assert_allclose(np.sum(got.weights, -1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("router", moe_ops.ROUTERS)
def test_selection_bias_changes_choice_not_weights(router):
    logits = normal(1, (N, E), 2.0)
    bias = jnp.zeros(E).at[E - 1].set(100.0)  # forces expert E-1 into every token's top 2
    got = moe_ops.route(logits, 2, router=router, selection_bias=bias)
    weights, experts = np_route(logits, 2, router, bias=bias)
    assert (np.asarray(got.experts)[:, 0] == E - 1).all()
    np.testing.assert_array_equal(got.experts, experts)
    # The gate is the unbiased score, and no gradient reaches the bias.
    assert_close(got.weights, weights, F32_OUT, "weights")
    grad = jax.grad(lambda b: jnp.sum(moe_ops.route(logits, 2, router=router, selection_bias=b).weights))(bias)
    np.testing.assert_array_equal(grad, 0.0)


# ---------------------------------------------------------------- dropless


@pytest.mark.parametrize("activation", moe_ops.ACTIVATIONS)
@pytest.mark.parametrize("impl", moe_ops.GROUPED_IMPLS)
@pytest.mark.parametrize(
    "router,renormalize,top_k", [("softmax_topk", False, 2), ("topk_softmax", False, 3), ("sigmoid", True, 1)]
)
def test_dropless_matches_dense_reference(activation, impl, router, renormalize, top_k):
    x, logits = normal(2, (N, D)), normal(3, (N, E), 2.0)
    w = expert_weights(4, activation=activation)
    y, aux = moe_ops.moe(
        x, logits, *w, top_k=top_k, router=router, renormalize=renormalize, activation=activation, impl=impl
    )
    weights, experts = np_route(logits, top_k, router, renormalize)
    assert_close(y, np_dense_moe(x, weights, experts, *w), F32_OUT, "y")
    assert float(aux.dropped_fraction) == 0.0


@pytest.mark.parametrize("activation", moe_ops.ACTIVATIONS)
@pytest.mark.parametrize("impl", moe_ops.GROUPED_IMPLS)
def test_dropless_gradients_match_dense(impl, activation):
    x, logits = normal(5, (N, D)), normal(6, (N, E), 2.0)
    w = expert_weights(7, activation=activation)
    cot = normal(8, (N, D))

    def loss(fn, x, logits, *w):
        routing = moe_ops.route(logits, 2)
        return jnp.sum(cot * fn(x, routing, *w))

    def dropless(x, routing, *w):
        return moe_ops.dropless_moe(x, routing.weights, routing.experts, *w, activation=activation, impl=impl)

    dense = lambda x, r, *w: jax_dense_moe(x, r.weights, r.experts, *w)
    args = (x, logits, *w)
    got = jax.grad(lambda *a: loss(dropless, *a), argnums=(0, 1, 2, 3, 4))(*args)
    want = jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2, 3, 4))(*args)
    # x, logits, w_up, w_down and, for SwiGLU, w_gate: every gradient is compared.
    assert num_leaves(got) == (5 if activation == "swiglu" else 4)
    assert_close(got, want, F32_GRAD, "grads of x, logits, w_gate, w_up, w_down")


@pytest.mark.parametrize("activation", moe_ops.ACTIVATIONS)
def test_tiled_handles_empty_groups_and_padding_rows(activation):
    # Groups of sizes 0, 5, 0, 3 and two padding rows past the last group, which must come back 0.
    x = normal(9, (10, D))
    w = expert_weights(10, e=4, activation=activation)
    sizes = jnp.array([0, 5, 0, 3], jnp.int32)
    ids = np.repeat(np.arange(4), np.asarray(sizes))
    want = np.zeros((10, D))
    for r, e in enumerate(ids):
        want[r] = np_expert(x[r : r + 1], *(None if a is None else a[e] for a in w))[0]
    for impl in moe_ops.GROUPED_IMPLS:
        got = moe_ops.grouped_experts(x, *w, sizes, activation=activation, impl=impl)
        assert_close(got, want, F32_OUT, impl)
        if activation == "swiglu":
            np.testing.assert_array_equal(moe_ops.grouped_swiglu(x, *w, sizes, impl=impl), got)


# ---------------------------------------------------------------- capacity


def test_capacity_slots_priority():
    # First choices of every token are served before any second choice.
    experts = jnp.array([[0, 1], [1, 0], [1, 2]], jnp.int32)
    slot, keep = moe_ops.capacity_slots(experts, 3, capacity=2)
    np.testing.assert_array_equal(slot, [[0, 2], [0, 1], [1, 0]])
    np.testing.assert_array_equal(keep, [[True, False], [True, True], [True, True]])


@pytest.mark.parametrize("activation", moe_ops.ACTIVATIONS)
@pytest.mark.parametrize("top_k,capacity_factor", [(1, 1.0), (2, 0.5)])
def test_capacity_drops_exactly_the_overflow(top_k, capacity_factor, activation):
    # Every token's first choice is expert 0 and its second expert 1: expert 0 (and 1) can keep
    # only C = ceil(cf · N·k / E) tokens, the first C in token order.
    n, e = 8, 4
    x = normal(11, (n, D))
    logits = jnp.tile(jnp.array([8.0, 4.0, 0.0, 0.0]), (n, 1))
    w = expert_weights(12, e=e, activation=activation)
    y, aux = moe_ops.moe(x, logits, *w, top_k=top_k, capacity_factor=capacity_factor, activation=activation)
    capacity = math.ceil(capacity_factor * n * top_k / e)
    assert capacity == 2
    assert float(aux.dropped_fraction) == pytest.approx((n * top_k - top_k * capacity) / (n * top_k))
    np.testing.assert_array_equal(aux.expert_counts, [n, n if top_k == 2 else 0, 0, 0])
    weights, experts = np_route(logits, top_k, "softmax_topk")
    keep = np.zeros((n, top_k), bool)
    keep[:capacity] = True
    want = np_dense_moe(x, weights, experts, *w, keep=keep)
    assert_close(y, want, F32_OUT, "y")
    np.testing.assert_array_equal(y[capacity:], 0.0)  # dropped tokens get nothing


@pytest.mark.parametrize("activation", moe_ops.ACTIVATIONS)
def test_capacity_matches_dense_reference_with_drops(activation):
    x, logits = normal(13, (N, D)), normal(14, (N, E), 2.0)
    w = expert_weights(15, activation=activation)
    y, aux = moe_ops.moe(x, logits, *w, top_k=2, capacity_factor=0.75, activation=activation)
    weights, experts = np_route(logits, 2, "softmax_topk")
    keep = np_capacity_keep(experts, E, math.ceil(0.75 * N * 2 / E))
    assert 0 < (~keep).sum() < keep.size  # some, not all, assignments dropped
    assert float(aux.dropped_fraction) == pytest.approx((~keep).mean())
    assert_close(y, np_dense_moe(x, weights, experts, *w, keep=keep), F32_OUT, "y")


@pytest.mark.parametrize("activation", moe_ops.ACTIVATIONS)
def test_capacity_gradients_match_dense(activation):
    x, logits = normal(25, (N, D)), normal(26, (N, E), 2.0)
    w = expert_weights(27, activation=activation)
    cot = normal(28, (N, D))
    capacity = math.ceil(0.75 * N * 2 / E)

    def loss(capacity_path, x, logits, *w):
        routing = moe_ops.route(logits, 2)
        slot, keep = moe_ops.capacity_slots(routing.experts, E, capacity)
        if capacity_path:
            y = moe_ops.capacity_moe(
                x, routing.weights, routing.experts, slot, keep, *w, capacity=capacity, activation=activation
            )
        else:
            y = jax_dense_moe(x, routing.weights, routing.experts, *w, keep=keep)
        return jnp.sum(cot * y)

    args = (x, logits, *w)
    got = jax.grad(lambda *a: loss(True, *a), argnums=(0, 1, 2, 3, 4))(*args)
    want = jax.grad(lambda *a: loss(False, *a), argnums=(0, 1, 2, 3, 4))(*args)
    _, keep = moe_ops.capacity_slots(moe_ops.route(logits, 2).experts, E, capacity)
    assert 0 < int(jnp.sum(~keep)) < keep.size  # the drops are part of what is differentiated
    assert num_leaves(got) == (5 if activation == "swiglu" else 4)
    assert_close(got, want, F32_GRAD, "grads of x, logits, w_gate, w_up, w_down")


# ---------------------------------------------------------------- balancing


def test_losses_and_counts_match_formulas():
    x, logits = normal(16, (N, D)), normal(17, (N, E), 2.0)
    _, aux = moe_ops.moe(x, logits, *expert_weights(18), top_k=2)
    z = np.asarray(logits, np.float64)
    _, experts = np_route(z, 2, "softmax_topk")
    counts = np.bincount(experts.ravel(), minlength=E)
    f = counts / experts.size
    p = np_softmax(z).mean(0)
    np.testing.assert_array_equal(aux.expert_counts, counts)
    assert float(aux.load_balancing_loss) == pytest.approx(E * np.sum(f * p), rel=1e-6)
    lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    assert float(aux.router_z_loss) == pytest.approx(np.mean(lse**2), rel=1e-6)


def test_uniform_routing_gives_loss_one():
    layer = MoE(D, F, E, 2, rngs=nnx.Rngs(0))
    layer.router.kernel[...] = jnp.zeros((D, E))
    _, aux = layer(normal(19, (2, 5, D)))
    assert float(aux.load_balancing_loss) == pytest.approx(1.0, rel=1e-6)
    assert float(aux.router_z_loss) == pytest.approx(math.log(E) ** 2, rel=1e-6)


def test_bias_update_moves_load_toward_uniform():
    # A router whose logits grow with the expert id sends most tokens to the last experts.
    tokens = 512
    logits = normal(20, (tokens, E)) + jnp.linspace(0.0, 3.0, E)
    step = jax.jit(
        lambda b: moe_ops.expert_counts(moe_ops.route(logits, 2, router="sigmoid", selection_bias=b).experts, E)
    )
    update = jax.jit(moe_ops.update_selection_bias)
    bias = jnp.zeros(E)
    imbalance = []  # max / mean load
    for _ in range(100):
        counts = step(bias)
        imbalance.append(float(jnp.max(counts) / jnp.mean(counts)))
        bias = update(bias, counts, 0.01)
    assert imbalance[0] > 2.5
    assert max(imbalance[-10:]) < 1.25
    assert np.argmin(np.asarray(bias)) == E - 1  # the favoured expert was pushed down most


def test_layer_selection_bias_is_not_a_param_and_steers_routing():
    layer = MoE(D, F, E, 1, router="sigmoid", use_selection_bias=True, rngs=nnx.Rngs(1))
    x = normal(21, (2, 6, D))
    _, before = layer(x)
    assert "selection_bias" not in nnx.state(layer, nnx.Param)
    busiest = int(jnp.argmax(before.expert_counts))
    layer.update_selection_bias(before.expert_counts, 10.0)  # a huge step: the busiest expert loses all
    assert float(layer.selection_bias[...][busiest]) == -10.0
    _, after = layer(x)
    assert int(after.expert_counts[busiest]) == 0


# ---------------------------------------------------------------- shared experts


@pytest.mark.parametrize("activation,routed_scale", [("swiglu", 1.0), ("relu2", 2.5)])
@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_and_gate(gated, activation, routed_scale):
    layer = MoE(
        D, F, E, 2, num_shared_experts=2, shared_d_ff=6, shared_expert_gate=gated, renormalize=True,
        activation=activation, routed_scale=routed_scale, rngs=nnx.Rngs(2),
    )
    unit_scale(layer, 30)
    assert layer.shared.up_proj.kernel.shape == (D, 12)  # 2 shared experts of width 6
    assert (layer.w_gate is None) == (activation == "relu2")  # relu2 experts are ungated
    x = normal(22, (2, 5, D))
    y, _ = layer(x)
    xs = np.asarray(x, np.float64).reshape(-1, D)
    logits = xs @ np.asarray(layer.router.kernel[...], np.float64)
    weights, experts = np_route(logits, 2, "softmax_topk", renormalize=True)
    w_gate = None if layer.w_gate is None else layer.w_gate[...]
    routed = routed_scale * np_dense_moe(xs, weights, experts, w_gate, layer.w_up[...], layer.w_down[...])
    s = layer.shared
    shared_gate = s.gate_proj.kernel[...] if activation == "swiglu" else None  # Relu2MLP has no gate_proj
    shared = np_expert(xs, shared_gate, s.up_proj.kernel[...], s.down_proj.kernel[...])
    if gated:
        shared = shared / (1 + np.exp(-(xs @ np.asarray(layer.shared_gate.kernel[...], np.float64))))
    assert np.sqrt(np.mean(shared**2)) > 0.1 * np.sqrt(np.mean(routed**2)) > 1e-2  # both parts matter
    assert_close(y.reshape(-1, D), routed + shared, F32_OUT, "y")


# ---------------------------------------------------------------- expert parallelism


def _layer_loss_and_grads(layer, x, cot):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def run(params, x):
        def loss(params, x):
            y, aux = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(cot * y) + aux.load_balancing_loss + aux.router_z_loss, (y, aux)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    return run, params


@pytest.mark.parametrize("activation", moe_ops.ACTIVATIONS)
@pytest.mark.parametrize(
    "mesh_shape,axis_type,capacity_factor,batch,time",
    [
        ((1, 8), AxisType.Explicit, None, 2, 8),  # the case: data=1, expert=8, 16 experts
        ((2, 4), AxisType.Explicit, 0.75, 3, 3),  # 9 tokens padded to 16; capacity drops
        ((1, 8), AxisType.Auto, None, 1, 8),
        ((8, 1), AxisType.Explicit, 1.0, 2, 4),  # no expert split: each device runs its tokens
    ],
)
def test_expert_parallel_equals_single_device(mesh_shape, axis_type, capacity_factor, batch, time, activation):
    layer = MoE(D, F, 16, 2, capacity_factor=capacity_factor, activation=activation, rngs=nnx.Rngs(3))
    layer = unit_scale(layer, 40)
    x = normal(23, (batch, time, D))
    cot = normal(24, (batch, time, D))
    run, params = _layer_loss_and_grads(layer, x, cot)
    (loss0, (y0, aux0)), grads0 = run(params, x)
    mesh = jax.make_mesh(mesh_shape, ("data", "expert"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda p, x: run(p, x))(params, x))
        (loss1, (y1, aux1)), grads1 = run(params, x)
    assert "shard_map" in jaxpr
    assert ("all_to_all" in jaxpr) == (mesh_shape[1] > 1)
    assert float(jnp.sqrt(jnp.mean(y0**2))) > 0.03  # far above assert_close's 1e-6 absolute pass
    assert_close(y1, y0, F32_OUT, "y")
    assert_close(aux1, aux0, F32_OUT, "aux")
    assert_close(grads1[1], grads0[1], F32_GRAD, "dx")
    flat0, tree0 = jax.tree_util.tree_flatten_with_path(grads0[0])
    flat1, tree1 = jax.tree_util.tree_flatten(grads1[0])
    # router.kernel, w_up, w_down and, for SwiGLU, w_gate
    assert tree0 == tree1 and len(flat0) == (4 if activation == "swiglu" else 3)
    for (path, g0), g1 in zip(flat0, flat1):
        assert float(jnp.max(jnp.abs(g0))) > 0, f"{jax.tree_util.keystr(path)}: zero reference gradient"
        assert_close(g1, g0, F32_GRAD, f"d{jax.tree_util.keystr(path)}")
    if capacity_factor is not None:
        assert float(aux0.dropped_fraction) > 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=9), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(router="softmax_then_topk"), "router"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(capacity_factor=True), "capacity_factor"),
        (dict(impl="megablox"), "impl"),
        (dict(activation="gelu"), "activation"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
    ],
)
def test_bad_config_raises(kwargs, match):
    args = dict(top_k=2) | kwargs
    with pytest.raises(ValueError, match=match):
        MoE(D, F, E, args.pop("top_k"), **args, rngs=nnx.Rngs(0))


def test_bad_input_raises():
    layer = MoE(D, F, E, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, D=8\]"):
        layer(jnp.zeros((4, D)))
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, D=8\]"):
        layer(jnp.zeros((1, 4, D + 1)))
    with pytest.raises(ValueError, match="use_selection_bias"):
        layer.update_selection_bias(jnp.ones(E), 0.1)
    with pytest.raises(ValueError, match="logits must have shape"):
        moe_ops.moe(jnp.zeros((4, D)), jnp.zeros((4, E + 1)), *expert_weights(0), top_k=2)
    x, logits = jnp.zeros((4, D)), jnp.zeros((4, E))
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_ops.moe(x, logits, *expert_weights(0), top_k=2, activation="gelu")
    with pytest.raises(ValueError, match="w_gate must be None for activation='relu2'"):
        moe_ops.moe(x, logits, *expert_weights(0), top_k=2, activation="relu2")
    with pytest.raises(ValueError, match=r"w_gate must have shape \[E, D=8, F\] for activation='swiglu', got None"):
        moe_ops.moe(x, logits, *expert_weights(0, activation="relu2"), top_k=2)
    w_gate, w_up, _ = expert_weights(0, activation="relu2")
    with pytest.raises(ValueError, match=r"w_down must have shape \[E=8, F=12, D=8\]"):
        moe_ops.moe(x, logits, w_gate, w_up, jnp.zeros((E, F + 1, D)), top_k=2, activation="relu2")


def test_experts_not_divisible_by_expert_axis_raises():
    layer = MoE(D, F, 12, 2, rngs=nnx.Rngs(0))
    with jax.set_mesh(jax.make_mesh((1, 8), ("data", "expert"))):
        with pytest.raises(ValueError, match="num_experts=12 must be divisible by .*'expert' \\(8\\)"):
            layer(jnp.zeros((1, 8, D)))
