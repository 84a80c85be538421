"""linear_attn, simple_gla and gla: every form against the float32 recurrent reference, which
is itself checked against a float64 numpy loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ops
from numerics import BF16_GATE_GRAD, BF16_GRAD, BF16_OUT, F32_GRAD, F32_OUT, assert_close

B, T, H, HV, K, V = 2, 37, 2, 4, 6, 5
SEGMENTS = np.array([[0] * 9 + [1] * 20 + [2] * 8, [3] * 37])


def make_inputs(seed=0, b=B, t=T, h=H, hv=HV, dk=K, dv=V, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    return dict(
        q=jax.random.normal(ks[0], (b, t, h, dk), dtype),
        k=jax.random.normal(ks[1], (b, t, h, dk), dtype),
        v=jax.random.normal(ks[2], (b, t, hv, dv), dtype),
        g=jax.nn.log_sigmoid(2.0 + 2.0 * jax.random.normal(ks[3], (b, t, hv))).astype(dtype),
        gk=jax.nn.log_sigmoid(2.0 + 2.0 * jax.random.normal(ks[4], (b, t, hv, dk))).astype(dtype),
        gamma=-jnp.linspace(0.01, 0.5, hv),
        s0=jax.random.normal(ks[5], (b, hv, dk, dv)),
    )


# Each op as (inputs, impl, **common) -> (o, S), with the gate arguments it takes.
OPS = {
    "linear_attn": lambda x, **kw: ops.linear_attn(x["q"], x["k"], x["v"], **kw),
    "simple_gla": lambda x, **kw: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], **kw),
    "simple_gla_gamma": lambda x, **kw: ops.simple_gla(x["q"], x["k"], x["v"], g_gamma=x["gamma"], **kw),
    "gla": lambda x, **kw: ops.gla(x["q"], x["k"], x["v"], x["gk"], **kw),
}
# Which inputs each op differentiates.
DIFF = {
    "linear_attn": ("q", "k", "v", "s0"),
    "simple_gla": ("q", "k", "v", "g", "s0"),
    "simple_gla_gamma": ("q", "k", "v", "s0"),
    "gla": ("q", "k", "v", "gk", "s0"),
}


def naive(x, op, segment_ids=None, s0=None):
    """float64 numpy loop of S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t K^-1/2."""
    q, k, v = (np.asarray(x[n], np.float64) for n in ("q", "k", "v"))
    b, t, h, dk = q.shape
    hv = v.shape[2]
    if op == "linear_attn":
        g = np.zeros((b, t, hv, 1))
    elif op == "simple_gla":
        g = np.asarray(x["g"], np.float64)[..., None]
    elif op == "simple_gla_gamma":
        g = np.broadcast_to(np.asarray(x["gamma"], np.float64)[None, None, :, None], (b, t, hv, 1))
    else:
        g = np.asarray(x["gk"], np.float64)
    q = np.repeat(q, hv // h, axis=2) * dk**-0.5
    k = np.repeat(k, hv // h, axis=2)
    s = np.zeros((b, hv, dk, v.shape[3])) if s0 is None else np.array(s0, np.float64)
    o = np.zeros(v.shape)
    for bi in range(b):
        for ti in range(t):
            if segment_ids is not None and ti > 0 and segment_ids[bi, ti] != segment_ids[bi, ti - 1]:
                s[bi] = 0.0
            s[bi] = s[bi] * np.exp(g[bi, ti])[..., None] + k[bi, ti][..., None] * v[bi, ti][:, None, :]
            o[bi, ti] = np.einsum("hk,hkv->hv", q[bi, ti], s[bi])
    return o, s


@functools.cache
def loss_and_grad(op, impl, chunk_size):
    """jit(value_and_grad) of a fixed random projection of (o, S), over the op's float inputs."""
    names = DIFF[op]

    def loss(diff, rest, segment_ids):
        x = {**rest, **diff}
        o, s = OPS[op](
            x, impl=impl, chunk_size=chunk_size, initial_state=x["s0"], output_final_state=True,
            segment_ids=segment_ids,
        )
        wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws), (o, s)

    def run(x, segment_ids):
        diff = {n: x[n] for n in names}
        rest = {n: a for n, a in x.items() if n not in names}
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(diff, rest, segment_ids)
        return out, grads

    return jax.jit(run)


@pytest.mark.parametrize("op", list(OPS))
def test_recurrent_matches_naive_loop(op):
    x = make_inputs()
    o, s = OPS[op](x, impl="recurrent", initial_state=x["s0"], output_final_state=True, segment_ids=SEGMENTS)
    o_ref, s_ref = naive(x, op, SEGMENTS, x["s0"])
    assert_close(o, o_ref, F32_OUT, "o")
    assert_close(s, s_ref, F32_OUT, "S")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("impl,chunk_size", [("associative", 64), ("chunk", 8), ("chunk", 64)])
def test_form_matches_recurrent(op, impl, chunk_size):
    x = make_inputs(seed=1)
    (o_ref, s_ref), g_ref = loss_and_grad(op, "recurrent", 64)(x, SEGMENTS)
    (o, s), grads = loss_and_grad(op, impl, chunk_size)(x, SEGMENTS)
    assert_close(o, o_ref, F32_OUT, "o")
    assert_close(s, s_ref, F32_OUT, "S")
    assert_close(grads, g_ref, F32_GRAD, "grads")


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
def test_ungrouped_heads_chunk_matches_recurrent(op):
    x = make_inputs(seed=2, h=3, hv=3, dk=8, dv=8, t=20)
    (o_ref, s_ref), g_ref = loss_and_grad(op, "recurrent", 64)(x, None)
    (o, s), grads = loss_and_grad(op, "chunk", 16)(x, None)
    assert_close((o, s), (o_ref, s_ref), F32_OUT, "outputs")
    assert_close(grads, g_ref, F32_GRAD, "grads")


@pytest.mark.parametrize("op", list(OPS))
def test_segments_equal_separate_runs(op):
    x = make_inputs(seed=3)
    o, _ = OPS[op](x, impl="chunk", chunk_size=8, initial_state=x["s0"], segment_ids=SEGMENTS)
    for row in range(B):
        bounds = np.flatnonzero(np.diff(SEGMENTS[row])) + 1
        for start, stop in zip([0, *bounds], [*bounds, T]):
            doc = {
                n: (a[row : row + 1, start:stop] if a.ndim >= 3 and a.shape[1] == T else a)
                for n, a in x.items()
            }
            s0 = x["s0"][row : row + 1] if start == 0 else None
            o_doc, _ = OPS[op](doc, impl="recurrent", initial_state=s0)
            assert_close(o[row : row + 1, start:stop], o_doc, F32_OUT, f"row {row} [{start}, {stop})")


@pytest.mark.parametrize("op", list(OPS))
def test_state_chaining(op):
    x = make_inputs(seed=4, b=1)
    o, s = OPS[op](x, impl="chunk", chunk_size=8, initial_state=x["s0"], output_final_state=True)
    split = 13
    first = {n: (a[:, :split] if a.ndim >= 3 and a.shape[1] == T else a) for n, a in x.items()}
    second = {n: (a[:, split:] if a.ndim >= 3 and a.shape[1] == T else a) for n, a in x.items()}
    o1, s1 = OPS[op](first, impl="chunk", chunk_size=8, initial_state=x["s0"], output_final_state=True)
    o2, s2 = OPS[op](second, impl="chunk", chunk_size=8, initial_state=s1, output_final_state=True)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, F32_OUT, "o")
    assert_close(s2, s, F32_OUT, "S")


@pytest.mark.parametrize("impl", ["recurrent", "associative", "chunk"])
def test_linear_attn_normalize_matches_formula(impl):
    x = make_inputs(seed=5)
    q, k = jax.nn.elu(x["q"]) + 1, jax.nn.elu(x["k"]) + 1  # positive feature map
    o, _ = ops.linear_attn(q, k, x["v"], normalize=True, segment_ids=SEGMENTS, impl=impl, chunk_size=8)
    qn = np.repeat(np.asarray(q, np.float64), HV // H, axis=2) * K**-0.5
    kn = np.repeat(np.asarray(k, np.float64), HV // H, axis=2)
    vn = np.asarray(x["v"], np.float64)
    expected = np.zeros(vn.shape)
    for b in range(B):
        for t in range(T):
            same = (SEGMENTS[b, : t + 1] == SEGMENTS[b, t])[:, None]
            scores = np.einsum("hk,shk->sh", qn[b, t], kn[b, : t + 1]) * same
            expected[b, t] = np.einsum("sh,shv->hv", scores, vn[b, : t + 1]) / scores.sum(0)[:, None]
    assert_close(o, expected, F32_OUT, "normalised o")


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
@pytest.mark.parametrize("extreme", [0.0, -1e4, -np.inf])
def test_extreme_gates_stay_finite_and_correct(op, extreme):
    """Gates of exactly 0 (no decay) and near or at -inf (a hard reset) at scattered positions."""
    x = make_inputs(seed=6)
    rng = np.random.default_rng(0)
    for name in ("g", "gk"):
        mask = rng.random(x[name].shape) < 0.15
        x[name] = jnp.where(mask, extreme, x[name])
    (o_ref, s_ref), g_ref = loss_and_grad(op, "recurrent", 64)(x, SEGMENTS)
    (o, s), grads = loss_and_grad(op, "chunk", 8)(x, SEGMENTS)
    assert_close((o, s), (o_ref, s_ref), F32_OUT, "outputs")
    # A gate at -inf has gradient exp(g)·(...) = 0 exactly; the chunk form treats gates below
    # the reset threshold as exact resets, whose gradient is 0 too.
    assert_close(grads, g_ref, F32_GRAD, "grads")


def test_simple_gla_65k_tokens_chunk_matches_recurrent():
    x = make_inputs(seed=7, b=1, t=65536, h=1, hv=1, dk=8, dv=8)
    run = jax.jit(
        lambda x, impl: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], initial_state=x["s0"], impl=impl, output_final_state=True),
        static_argnums=1,
    )
    o, s = run(x, "chunk")
    o_ref, s_ref = run(x, "recurrent")
    assert_close(o, o_ref, F32_OUT, "o")
    assert_close(s, s_ref, F32_OUT, "S")


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
def test_bf16_inputs_against_float32_reference(op):
    x32 = make_inputs(seed=8)
    x16 = {n: (a.astype(jnp.bfloat16) if n != "s0" else a) for n, a in x32.items()}
    # The reference sees exactly the bf16-rounded values, in float32.
    x_ref = {n: a.astype(jnp.float32) for n, a in x16.items()}
    (o_ref, s_ref), g_ref = loss_and_grad(op, "recurrent", 64)(x_ref, SEGMENTS)
    (o, s), grads = loss_and_grad(op, "chunk", 64)(x16, SEGMENTS)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(o, o_ref, BF16_OUT, "o")
    assert_close(s, s_ref, BF16_OUT, "S")
    for name, grad in grads.items():
        tol = BF16_GATE_GRAD if name in ("g", "gk") else BF16_GRAD
        assert_close(grad, g_ref[name], tol, f"d{name}")
