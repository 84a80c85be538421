"""Plain DeltaNet: GatedDeltaNet(decay=False) and the mixer letter R, against a step-by-step
float64 numpy formula, prefill + decode against one full pass, packed documents against each
document alone, and the config, parameters and FLOPs of the letter.

The scenario and helpers are those of tests/test_layer_mixers.py (B=3 rows of T=12 tokens: row 0
packs documents A and B, rows 1 and 2 start with A and B alone)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers.gated_deltanet import GatedDeltaNet
from jaxlm.models import LM, MIXERS, ModelConfig
from jaxlm.models.block import build_mixer
from jaxlm.models.flops import delta_chunk_flops, flops_breakdown
from numerics import F32_OUT, assert_close
from test_layer_mixers import D_MODEL, LEN_A, LEN_B, PROMPT, T, apply, p64, randomize, rms, short_conv, sigmoid, silu


def ref_deltanet(layer: GatedDeltaNet, x):
    """One document x [T, D]: S ← S + k (β (v − Sᵀk))ᵀ with no decay, o = Sᵀ(q/√K), then the
    gated RMSNorm per value head and o_proj."""
    t = x.shape[0]
    h, dk, hv, dv = layer.n_heads, layer.head_dim, layer.n_v_heads, layer.head_v_dim
    u = np.concatenate([x @ p64(layer.q_proj.kernel), x @ p64(layer.k_proj.kernel), x @ p64(layer.v_proj.kernel)], -1)
    u = short_conv(u, p64(layer.conv_weight))
    q = u[:, : h * dk].reshape(t, h, dk)
    k = u[:, h * dk : 2 * h * dk].reshape(t, h, dk)
    v = u[:, 2 * h * dk :].reshape(t, hv, dv)
    q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
    k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    beta = sigmoid(x @ p64(layer.b_proj.kernel))
    s = np.zeros((hv, dk, dv))
    o = np.zeros((t, hv, dv))
    for ti in range(t):
        for j in range(hv):
            i = j // (hv // h)
            s[j] = s[j] + np.outer(k[ti, i], beta[ti, j] * (v[ti, j] - s[j].T @ k[ti, i]))
            o[ti, j] = s[j].T @ (q[ti, i] / np.sqrt(dk))
    z = (x @ p64(layer.g_proj.kernel)).reshape(t, hv, dv)
    o = rms(o, p64(layer.o_norm.weight), layer.o_norm.eps) * silu(z)
    return o.reshape(t, hv * dv) @ p64(layer.o_proj.kernel)


@pytest.fixture(scope="module")
def scenario():
    """(layer, x [3, T, D], segment_ids [3, T], full-pass output [3, T, D]) with grouped values."""
    layer = GatedDeltaNet(D_MODEL, 2, head_dim=8, n_v_heads=4, head_v_dim=6, decay=False, chunk_size=4,
                          rngs=nnx.Rngs(0))
    randomize(layer, 1)
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.standard_normal((LEN_A, D_MODEL)), rng.standard_normal((LEN_B, D_MODEL))
    rows = [np.concatenate([doc_a, doc_b]), np.concatenate([doc_a, rng.standard_normal((LEN_B, D_MODEL))]),
            np.concatenate([doc_b, rng.standard_normal((LEN_A, D_MODEL))])]
    x = jnp.asarray(np.stack(rows), jnp.float32)
    seg = np.zeros((3, T), np.int32)
    seg[0, LEN_A:] = 1
    y, cache = apply(layer, x, jnp.asarray(seg))
    assert cache is None
    return layer, x, jnp.asarray(seg), np.asarray(y)


def test_deltanet_matches_step_by_step_formula(scenario):
    layer, x, _, y = scenario
    x64 = np.asarray(x, np.float64)
    expected = np.stack([
        np.concatenate([ref_deltanet(layer, x64[0, :LEN_A]), ref_deltanet(layer, x64[0, LEN_A:])]),
        ref_deltanet(layer, x64[1]),
        ref_deltanet(layer, x64[2]),
    ])
    assert_close(y, expected, F32_OUT, "deltanet")


def test_deltanet_packed_documents_equal_each_alone(scenario):
    _, _, _, y = scenario
    assert_close(y[0, :LEN_A], y[1, :LEN_A], F32_OUT, "deltanet document A")
    assert_close(y[0, LEN_A:], y[2, :LEN_B], F32_OUT, "deltanet document B")


def test_deltanet_prefill_then_decode_equals_full_pass(scenario):
    layer, x, seg, y = scenario
    cache = layer.init_cache(3, 16)
    out, cache = apply(layer, x[:, :PROMPT], seg[:, :PROMPT], cache)
    outs = [out]
    for t in range(PROMPT, T):
        out, cache = apply(layer, x[:, t : t + 1], None, cache)
        outs.append(out)
    assert_close(np.concatenate(outs, axis=1), y, F32_OUT, "deltanet decode")


def test_deltanet_is_gated_deltanet_with_a_zero_decay(scenario):
    """With A_log = -inf the gated layer's g is -0·softplus(...) = 0: no decay, so given the same
    shared parameters it must give DeltaNet's outputs."""
    layer, x, seg, y = scenario
    gated = GatedDeltaNet(D_MODEL, 2, head_dim=8, n_v_heads=4, head_v_dim=6, chunk_size=4, rngs=nnx.Rngs(0))
    shared = nnx.state(layer, nnx.Param)
    nnx.update(gated, shared)
    gated.A_log[...] = jnp.full_like(gated.A_log[...], -jnp.inf)
    y_gated, _ = apply(gated, x, seg)
    assert_close(np.asarray(y_gated), y, F32_OUT, "gated deltanet with no decay")


def test_mixer_letter_R_builds_deltanet_without_decay_parameters():
    config = ModelConfig(d_model=32, n_heads=2, layer_pattern="RG", ffn_pattern="-", n_layers=2)
    assert "R" in MIXERS
    r, g = build_mixer("R", config, 0, nnx.Rngs(0)), build_mixer("G", config, 1, nnx.Rngs(0))
    assert isinstance(r, GatedDeltaNet) and not r.decay and g.decay
    assert r.a_proj is None and r.A_log is None and r.dt_bias is None
    names = lambda m: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assert names(g) - names(r) == {"a_proj.kernel", "A_log", "dt_bias"}
    assert names(r) < names(g)
    model = LM(config, rngs=nnx.Rngs(0))
    assert [b.mixer.decay for b in model.blocks] == [False, True]


def test_deltanet_flops_count_its_parameters():
    """2 × every projection kernel (no decay projection), the conv, and the delta chunk form."""
    config = ModelConfig(d_model=32, n_heads=2, layer_pattern="R", ffn_pattern="-", n_layers=1, chunk_size=16)
    layer = build_mixer("R", config, 0, nnx.Rngs(0))
    kernels = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param)) if p[-1] == "kernel")
    parts = flops_breakdown(config, 64)
    assert parts["dense_matmuls"] == 2 * kernels
    assert parts["conv"] == 2 * int(np.prod(layer.conv_weight.shape))
    assert parts["recurrence_mixing"] == 2 * delta_chunk_flops(16, 16, 16)
    gated = flops_breakdown(config.replace(layer_pattern="G"), 64)
    assert gated["dense_matmuls"] - parts["dense_matmuls"] == 2 * 32 * 2  # a_proj [D, HV]
