"""Every mixer layer against a step-by-step float64 numpy formula, prefill + decode against one
full pass, packed documents against each document alone, and cache sizes.

One scenario per layer, all at the same shapes so that each layer compiles three times (full
pass, prefill, decode step): B=3 rows of T=12 tokens,
  row 0: document A (5 tokens) then document B (7 tokens), packed with segment_ids;
  row 1: document A then 7 other tokens;   row 2: document B then 5 other tokens.
By causality, the first tokens of rows 1 and 2 are A and B alone. Row 0 is also what a
left-padded batch looks like: 5 padding tokens as their own segment, then the prompt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers.attention import Attention
from jaxlm.layers.cache import RecurrentCache
from jaxlm.ops import KVCache
from jaxlm.layers.gated_deltanet import GatedDeltaNet
from jaxlm.layers.gla import GatedLinearAttention
from jaxlm.layers.kda import KimiDeltaAttention
from jaxlm.layers.lightning import LightningAttention
from jaxlm.layers.linear_attention import LinearAttention
from jaxlm.layers.mamba2 import Mamba2
from numerics import F32_OUT, assert_close

# Layer outputs compose projections, convs, norms and an op; they land near 2e-7 of the float64
# formula, so the float32 form-against-form tolerance applies to the formula and to forms of the
# same layer alike (the issue asks for 1e-4; this is stricter).
FORMULA_TOL = F32_OUT

D_MODEL, T, LEN_A, PROMPT = 32, 12, 5, 7
LEN_B = T - LEN_A


# ----------------------------------------------------------------------------- numpy formulas


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def p64(variable):
    return np.asarray(variable[...], np.float64)


def short_conv(u, weight, bias=None):
    """u [T, C] one document; weight [C, W], weight[:, W-1] on the current token; then SiLU."""
    t, _ = u.shape
    w = weight.shape[1]
    y = np.zeros_like(u)
    for ti in range(t):
        acc = np.zeros(u.shape[1]) if bias is None else bias.copy()
        for i in range(w):
            s = ti - (w - 1) + i
            if s >= 0:
                acc = acc + weight[:, i] * u[s]
        y[ti] = acc
    return silu(y)


def rope(x, positions, theta, rotary_dim):
    """x [T, H, K]: channel i < r/2 pairs with i + r/2 and turns by position·θ^(−2i/r)."""
    out = x.copy()
    half = rotary_dim // 2
    for ti, p in enumerate(positions):
        for i in range(half):
            a = p * theta ** (-2.0 * i / rotary_dim)
            c, s = np.cos(a), np.sin(a)
            x1, x2 = x[ti, :, i], x[ti, :, i + half]
            out[ti, :, i] = x1 * c - x2 * s
            out[ti, :, i + half] = x2 * c + x1 * s
    return out


def ref_attention(layer: Attention, x):
    t = x.shape[0]
    h, hk, dk = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = (x @ p64(layer.q_proj.kernel)).reshape(t, h, dk)
    k = (x @ p64(layer.k_proj.kernel)).reshape(t, hk, dk)
    v = (x @ p64(layer.v_proj.kernel)).reshape(t, hk, dk)
    if layer.q_norm is not None:
        wq, wk = p64(layer.q_norm.weight), p64(layer.k_norm.weight)
        if layer.q_norm.zero_centered:
            wq, wk = 1.0 + wq, 1.0 + wk
        q, k = rms(q, wq, layer.q_norm.eps), rms(k, wk, layer.k_norm.eps)
    q = rope(q, range(t), layer.rope_theta, layer.rotary_dim)
    k = rope(k, range(t), layer.rope_theta, layer.rotary_dim)
    o = np.zeros((t, h, dk))
    for ti in range(t):
        lo = 0 if layer.window is None else max(0, ti - layer.window + 1)
        for hi in range(h):
            kv = hi // (h // hk)
            scores = np.array([q[ti, hi] @ k[s, kv] for s in range(lo, ti + 1)]) / np.sqrt(dk)
            p = np.exp(scores - scores.max())
            o[ti, hi] = (p / p.sum()) @ v[lo : ti + 1, kv]
    o = o.reshape(t, h * dk)
    if layer.gate_proj is not None:
        o = o * sigmoid(x @ p64(layer.gate_proj.kernel))
    return o @ p64(layer.o_proj.kernel)


def ref_mamba2(layer: Mamba2, x):
    t = x.shape[0]
    hv, p, n, g = layer.n_heads, layer.head_dim, layer.d_state, layer.n_groups
    di = layer.d_inner
    zxbcdt = x @ p64(layer.in_proj.kernel)
    z, xbc, dt = zxbcdt[:, :di], zxbcdt[:, di : di + layer.conv_dim], zxbcdt[:, di + layer.conv_dim :]
    xbc = short_conv(xbc, p64(layer.conv_weight), p64(layer.conv_bias))
    xs = xbc[:, :di].reshape(t, hv, p)
    bm = xbc[:, di : di + g * n].reshape(t, g, n)
    cm = xbc[:, di + g * n :].reshape(t, g, n)
    dt = softplus(dt + p64(layer.dt_bias))
    a = -np.exp(p64(layer.A_log))
    d = p64(layer.D)
    h = np.zeros((hv, n, p))
    y = np.zeros((t, hv, p))
    for ti in range(t):
        for j in range(hv):
            grp = j // (hv // g)
            # h_t = exp(dt·A) h_{t-1} + dt · B_t x_tᵀ;  y_t = C_tᵀ h_t + D x_t
            h[j] = np.exp(dt[ti, j] * a[j]) * h[j] + dt[ti, j] * np.outer(bm[ti, grp], xs[ti, j])
            y[ti, j] = cm[ti, grp] @ h[j] + d[j] * xs[ti, j]
    u = y.reshape(t, di) * silu(z)  # Mamba-2 gates before the norm, which runs per group
    u = rms(u.reshape(t, g, di // g), 1.0, layer.norm.eps).reshape(t, di) * p64(layer.norm.weight)
    return u @ p64(layer.out_proj.kernel)


def ref_gated_deltanet(layer: GatedDeltaNet, x):
    """One document x [T, D] through the gated delta rule (g = 0 with decay=False), the gated
    RMSNorm per value head and o_proj, in float64."""
    t = x.shape[0]
    h, dk, hv, dv = layer.n_heads, layer.head_dim, layer.n_v_heads, layer.head_v_dim
    u = np.concatenate([x @ p64(layer.q_proj.kernel), x @ p64(layer.k_proj.kernel), x @ p64(layer.v_proj.kernel)], -1)
    u = short_conv(u, p64(layer.conv_weight))
    q = u[:, : h * dk].reshape(t, h, dk)
    k = u[:, h * dk : 2 * h * dk].reshape(t, h, dk)
    v = u[:, 2 * h * dk :].reshape(t, hv, dv)
    q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
    k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    if layer.decay:
        g = -np.exp(p64(layer.A_log)) * softplus(x @ p64(layer.a_proj.kernel) + p64(layer.dt_bias))
    else:  # plain DeltaNet: S ← S + k (β (v − Sᵀk))ᵀ, no decay
        g = np.zeros((t, hv))
    beta = sigmoid(x @ p64(layer.b_proj.kernel)) * (2.0 if layer.allow_neg_eigval else 1.0)
    s = np.zeros((hv, dk, dv))
    o = np.zeros((t, hv, dv))
    for ti in range(t):
        for j in range(hv):
            i = j // (hv // h)
            s[j] = np.exp(g[ti, j]) * s[j]
            s[j] = s[j] + np.outer(k[ti, i], beta[ti, j] * (v[ti, j] - s[j].T @ k[ti, i]))
            o[ti, j] = s[j].T @ (q[ti, i] / np.sqrt(dk))
    z = (x @ p64(layer.g_proj.kernel)).reshape(t, hv, dv)
    o = rms(o, p64(layer.o_norm.weight), layer.o_norm.eps) * silu(z)
    return o.reshape(t, hv * dv) @ p64(layer.o_proj.kernel)


def ref_kda(layer: KimiDeltaAttention, x):
    """One document through Kimi Delta Attention: the delta rule with a decay per key channel,
    the sigmoid-gated RMSNorm per head and o_proj, in float64."""
    t = x.shape[0]
    h, dk, dv = layer.n_heads, layer.head_dim, layer.head_v_dim
    u = np.concatenate([x @ p64(layer.q_proj.kernel), x @ p64(layer.k_proj.kernel), x @ p64(layer.v_proj.kernel)], -1)
    u = short_conv(u, p64(layer.conv_weight))
    q = u[:, : h * dk].reshape(t, h, dk)
    k = u[:, h * dk : 2 * h * dk].reshape(t, h, dk)
    v = u[:, 2 * h * dk :].reshape(t, h, dv)
    q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
    k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    a = x @ p64(layer.f_a_proj.kernel) @ p64(layer.f_b_proj.kernel) + p64(layer.dt_bias)
    g = -np.exp(p64(layer.A_log))[:, None] * softplus(a.reshape(t, h, dk))
    beta = sigmoid(x @ p64(layer.b_proj.kernel))
    s = np.zeros((h, dk, dv))
    o = np.zeros((t, h, dv))
    for ti in range(t):
        for j in range(h):
            s[j] = np.exp(g[ti, j])[:, None] * s[j]
            s[j] = s[j] + np.outer(k[ti, j], beta[ti, j] * (v[ti, j] - s[j].T @ k[ti, j]))
            o[ti, j] = s[j].T @ (q[ti, j] / np.sqrt(dk))
    z = (x @ p64(layer.g_a_proj.kernel) @ p64(layer.g_b_proj.kernel)).reshape(t, h, dv)
    o = rms(o, p64(layer.o_norm.weight), layer.o_norm.eps) * sigmoid(z)
    return o.reshape(t, h * dv) @ p64(layer.o_proj.kernel)


def ref_gla(layer: GatedLinearAttention, x):
    t = x.shape[0]
    h, dk, dv = layer.n_heads, layer.head_dim, layer.head_v_dim
    q = (x @ p64(layer.q_proj.kernel)).reshape(t, h, dk)
    k = (x @ p64(layer.k_proj.kernel)).reshape(t, h, dk)
    v = (x @ p64(layer.v_proj.kernel)).reshape(t, h, dv)
    logits = x @ p64(layer.gk_down.kernel) @ p64(layer.gk_up.kernel) + p64(layer.gk_up.bias)
    gk = (-np.log1p(np.exp(-logits)) / layer.gate_logit_normalizer).reshape(t, h, dk)
    s = np.zeros((h, dk, dv))
    o = np.zeros((t, h, dv))
    for ti in range(t):
        for j in range(h):
            s[j] = np.exp(gk[ti, j])[:, None] * s[j] + np.outer(k[ti, j], v[ti, j])
            o[ti, j] = s[j].T @ (q[ti, j] / np.sqrt(dk))
    z = (x @ p64(layer.g_proj.kernel)).reshape(t, h, dv)
    o = rms(o, p64(layer.o_norm.weight), layer.o_norm.eps) * silu(z)
    return o.reshape(t, h * dv) @ p64(layer.o_proj.kernel)


def ref_lightning(layer: LightningAttention, x, layer_idx, n_layers):
    t = x.shape[0]
    h, dk = layer.n_heads, layer.head_dim
    q = silu(x @ p64(layer.q_proj.kernel)).reshape(t, h, dk)
    k = silu(x @ p64(layer.k_proj.kernel)).reshape(t, h, dk)
    v = silu(x @ p64(layer.v_proj.kernel)).reshape(t, h, dk)
    # MiniMax: slope_h = (2^(-8/H))^(h+1), scaled by 1 - l/(L-1) (+1e-5 guards); decay exp(-rate).
    base = 1.0 / 2 ** (8.0 / h)
    rate = base ** np.arange(1, h + 1) * (1 - layer_idx / (n_layers - 1 + 1e-5) + 1e-5)
    s = np.zeros((h, dk, dk))
    o = np.zeros((t, h, dk))
    for ti in range(t):
        for j in range(h):
            s[j] = np.exp(-rate[j]) * s[j] + np.outer(k[ti, j], v[ti, j])
            o[ti, j] = s[j].T @ q[ti, j]
    o = rms(o.reshape(t, h * dk), p64(layer.norm.weight), layer.norm.eps)
    o = o * sigmoid(x @ p64(layer.output_gate.kernel))
    return o @ p64(layer.out_proj.kernel)


def ref_linear_attention(layer: LinearAttention, x):
    t = x.shape[0]
    h, dk, dv = layer.n_heads, layer.head_dim, layer.head_v_dim

    def elu1(u):
        return np.where(u > 0, u + 1.0, np.exp(u))

    q = elu1(x @ p64(layer.q_proj.kernel)).reshape(t, h, dk)
    k = elu1(x @ p64(layer.k_proj.kernel)).reshape(t, h, dk)
    v = (x @ p64(layer.v_proj.kernel)).reshape(t, h, dv)
    o = np.zeros((t, h, dv))
    for ti in range(t):
        for j in range(h):
            w = np.array([q[ti, j] @ k[s, j] for s in range(ti + 1)])
            o[ti, j] = (w @ v[: ti + 1, j]) / w.sum()
    if layer.o_norm is not None:
        o = rms(o, p64(layer.o_norm.weight), layer.o_norm.eps)
    return o.reshape(t, h * dv) @ p64(layer.o_proj.kernel)


# ----------------------------------------------------------------------------- the layers

LIGHTNING_DEPTH = (1, 4)  # layer_idx, n_layers

LAYERS = {
    "attention": (
        lambda r: Attention(
            D_MODEL, 4, n_kv_heads=2, qk_norm=True, zero_centered_qk_norm=True, output_gate=True,
            rotary_dim=4, rope_theta=100.0, rngs=r,
        ),
        ref_attention,
    ),
    "sliding_attention": (lambda r: Attention(D_MODEL, 4, window=4, rngs=r), ref_attention),
    "mamba2": (lambda r: Mamba2(D_MODEL, d_state=8, head_dim=16, n_groups=2, chunk_size=4, rngs=r), ref_mamba2),
    "gated_deltanet": (
        lambda r: GatedDeltaNet(D_MODEL, 2, head_dim=8, n_v_heads=4, head_v_dim=6, chunk_size=4, rngs=r),
        ref_gated_deltanet,
    ),
    "deltanet": (  # plain DeltaNet: no decay parameters, g = 0
        lambda r: GatedDeltaNet(D_MODEL, 2, head_dim=8, n_v_heads=4, head_v_dim=6, decay=False, chunk_size=4, rngs=r),
        ref_gated_deltanet,
    ),
    "gated_deltanet_neg_eigval": (
        lambda r: GatedDeltaNet(D_MODEL, 2, head_dim=8, allow_neg_eigval=True, chunk_size=4, rngs=r),
        ref_gated_deltanet,
    ),
    "kda": (
        lambda r: KimiDeltaAttention(D_MODEL, 2, head_dim=8, head_v_dim=6, gate_low_rank_dim=4, chunk_size=4, rngs=r),
        ref_kda,
    ),
    "gla": (lambda r: GatedLinearAttention(D_MODEL, 2, chunk_size=4, rngs=r), ref_gla),
    "lightning": (
        lambda r: LightningAttention(
            D_MODEL, 4, layer_idx=LIGHTNING_DEPTH[0], n_layers=LIGHTNING_DEPTH[1], chunk_size=4, rngs=r
        ),
        lambda layer, x: ref_lightning(layer, x, *LIGHTNING_DEPTH),
    ),
    "linear_attention": (
        lambda r: LinearAttention(D_MODEL, 4, output_norm=True, chunk_size=4, rngs=r),
        ref_linear_attention,
    ),
}


def randomize(layer: nnx.Module, seed: int) -> None:
    """Replaces the initial parameters by random ones of order one, so that norm weights, biases
    and decays all differ from their initial constants and every term of the formula shows."""
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def draw(p):
        p = np.asarray(p)
        scale = p.shape[0] ** -0.5 if p.ndim == 2 else 0.3
        return jnp.asarray(p + scale * rng.standard_normal(p.shape), p.dtype)

    nnx.update(layer, jax.tree.map(draw, params))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, segment_ids, cache):
    return nnx.merge(graphdef, state)(x, segment_ids=segment_ids, cache=cache)


def apply(layer, x, segment_ids=None, cache=None):
    graphdef, state = nnx.split(layer)
    return _apply(graphdef, state, x, segment_ids, cache)


@functools.lru_cache(maxsize=None)
def scenario(name: str):
    """(layer, x [3, T, D] float32, segment_ids [3, T], full-pass output) for one layer."""
    layer = LAYERS[name][0](nnx.Rngs(0))
    randomize(layer, 1)
    rng = np.random.default_rng(2)
    doc_a = rng.standard_normal((LEN_A, D_MODEL))
    doc_b = rng.standard_normal((LEN_B, D_MODEL))
    rows = [
        np.concatenate([doc_a, doc_b]),
        np.concatenate([doc_a, rng.standard_normal((LEN_B, D_MODEL))]),
        np.concatenate([doc_b, rng.standard_normal((LEN_A, D_MODEL))]),
    ]
    x = jnp.asarray(np.stack(rows), jnp.float32)
    seg = np.zeros((3, T), np.int32)
    seg[0, LEN_A:] = 1
    y, cache = apply(layer, x, jnp.asarray(seg))
    assert cache is None
    return layer, x, jnp.asarray(seg), np.asarray(y)


@pytest.mark.parametrize("name", list(LAYERS))
def test_matches_step_by_step_formula(name):
    layer, x, _, y = scenario(name)
    reference = LAYERS[name][1]
    x64 = np.asarray(x, np.float64)
    expected = np.stack(
        [
            np.concatenate([reference(layer, x64[0, :LEN_A]), reference(layer, x64[0, LEN_A:])]),
            reference(layer, x64[1]),
            reference(layer, x64[2]),
        ]
    )
    assert_close(y, expected, FORMULA_TOL, name)


@pytest.mark.parametrize("name", list(LAYERS))
def test_packed_documents_equal_each_alone(name):
    _, _, _, y = scenario(name)
    assert_close(y[0, :LEN_A], y[1, :LEN_A], F32_OUT, f"{name} document A")
    assert_close(y[0, LEN_A:], y[2, :LEN_B], F32_OUT, f"{name} document B")


@pytest.mark.parametrize("name", list(LAYERS))
def test_prefill_then_decode_equals_full_pass(name):
    """Prefill 7 tokens (row 0's second document starts inside the prompt), then decode the rest
    one token at a time. Row 0 is a left-padded prompt: decoding must never read document A."""
    layer, x, seg, y = scenario(name)
    cache = layer.init_cache(3, 16)
    out, cache = apply(layer, x[:, :PROMPT], seg[:, :PROMPT], cache)
    outs = [out]
    for t in range(PROMPT, T):
        out, cache = apply(layer, x[:, t : t + 1], None, cache)
        outs.append(out)
    assert_close(np.concatenate(outs, axis=1), y, F32_OUT, name)


@pytest.mark.parametrize("name", list(LAYERS))
def test_cache_size(name):
    layer = scenario(name)[0]
    short = jax.tree.map(jnp.shape, layer.init_cache(2, 16))
    long = jax.tree.map(jnp.shape, layer.init_cache(2, 4096))
    if isinstance(layer, Attention):
        assert isinstance(short, KVCache)
        slots = 4096 if layer.window is None else layer.window
        assert long.k == long.v == (2, layer.n_kv_heads, slots, layer.head_dim)  # head-major
        assert long.key_doc == (2, slots)
        if layer.window is not None:
            assert short == long  # a ring buffer of `window` slots at any max_len
    else:
        assert isinstance(short, RecurrentCache)
        assert short == long  # independent of max_len
        assert layer.init_cache(2, 16).state.dtype == jnp.float32


def test_recurrent_cache_shapes():
    """The state is [B, HV, K, V] float32 and the conv state holds the last W-1 conv inputs."""
    shapes = {name: jax.tree.map(jnp.shape, scenario(name)[0].init_cache(2, 16)) for name in LAYERS}
    assert shapes["mamba2"] == RecurrentCache(state=(2, 4, 8, 16), conv=(2, 3, 64 + 2 * 2 * 8))
    assert shapes["gated_deltanet"] == RecurrentCache(state=(2, 4, 8, 6), conv=(2, 3, 2 * 16 + 24))
    assert shapes["kda"] == RecurrentCache(state=(2, 2, 8, 6), conv=(2, 3, 2 * 16 + 12))
    assert shapes["gla"] == RecurrentCache(state=(2, 2, 8, 16), conv=None)
    assert shapes["lightning"] == RecurrentCache(state=(2, 4, 8, 8), conv=None)
    # The normaliser rides in an extra value column of the state.
    assert shapes["linear_attention"] == RecurrentCache(state=(2, 4, 8, 9), conv=None)


@pytest.mark.parametrize("name", list(LAYERS))
def test_prefill_continues_a_nonempty_cache(name):
    """Decode 5 tokens, then prefill the other 7 as one chunk from that cache: the chunk form
    must start from the carried state and conv state, and attention from the written keys (the
    sliding window's ring has already wrapped). The call's first document continues the cached
    one, so each row is one document here, checked against the formula."""
    layer, x, _, _ = scenario(name)
    cache = layer.init_cache(3, 16)
    outs = []
    for t in range(T - PROMPT):
        out, cache = apply(layer, x[:, t : t + 1], None, cache)
        outs.append(out)
    out, cache = apply(layer, x[:, T - PROMPT :], jnp.zeros((3, PROMPT), jnp.int32), cache)
    outs.append(out)
    reference = LAYERS[name][1]
    expected = np.stack([reference(layer, row) for row in np.asarray(x, np.float64)])
    assert_close(np.concatenate(outs, axis=1), expected, FORMULA_TOL, name)
