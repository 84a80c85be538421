"""The building blocks of the layers against their formulas in numpy: RMSNorm (plain,
zero-centred, gated), RoPE, SwiGLU, the embedding and its tied or untied head; the blocked
cached-attention path; and the ValueErrors a bad configuration raises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers.attention import Attention
from jaxlm.ops.attention.cached import write_slot
from jaxlm.ops.attention.xla import masked_attention
from jaxlm.layers.embedding import Embedding
from jaxlm.layers.gated_deltanet import GatedDeltaNet
from jaxlm.layers.gla import GatedLinearAttention
from jaxlm.layers.lightning import LightningAttention, lightning_log_decay
from jaxlm.layers.linear_attention import LinearAttention
from jaxlm.layers.mamba2 import Mamba2
from jaxlm.layers.mlp import SwiGLU
from jaxlm.layers.norms import GatedRMSNorm, RMSNorm
from jaxlm.layers.rotary import apply_rope
from numerics import F32_GRAD, F32_OUT, assert_close


def normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def np_rms(x, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


def set_param(param, value):
    param[...] = jnp.asarray(value, param[...].dtype)


# ----------------------------------------------------------------------------- norms


def test_rms_norm():
    norm = RMSNorm(8, eps=1e-5)
    w = normal(0, (8,))
    set_param(norm.weight, w)
    x = normal(1, (2, 3, 8))
    assert_close(norm(jnp.asarray(x)), np_rms(x, 1e-5) * w, F32_OUT, "rms_norm")


def test_zero_centered_rms_norm_stores_an_offset_from_one():
    norm = RMSNorm(8, eps=1e-6, zero_centered=True)
    x = normal(1, (2, 3, 8))
    np.testing.assert_array_equal(np.asarray(norm.weight[...]), np.zeros(8))  # starts as the identity scale
    assert_close(norm(jnp.asarray(x)), np_rms(x, 1e-6), F32_OUT, "zero-centred at init")
    w = normal(2, (8,))
    set_param(norm.weight, w)
    assert_close(norm(jnp.asarray(x)), np_rms(x, 1e-6) * (1.0 + w), F32_OUT, "zero-centred")


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gated_rms_norm(norm_before_gate, group_size):
    norm = GatedRMSNorm(8, eps=1e-5, norm_before_gate=norm_before_gate, group_size=group_size)
    w = normal(0, (8,))
    set_param(norm.weight, w)
    x, z = normal(1, (2, 3, 8)), normal(2, (2, 3, 8))
    g = 8 if group_size is None else group_size

    def grouped_rms(u):
        return np_rms(u.reshape(2, 3, 8 // g, g), 1e-5).reshape(2, 3, 8)

    if norm_before_gate:  # Gated DeltaNet, GLA: norm(x)·w·silu(z)
        expected = grouped_rms(x) * w * silu(np.float64(z))
    else:  # Mamba-2: norm(x·silu(z))·w
        expected = grouped_rms(x * silu(np.float64(z))) * w
    assert_close(norm(jnp.asarray(x), jnp.asarray(z)), expected, F32_OUT, "gated_rms_norm")


# ----------------------------------------------------------------------------- RoPE


def np_rope(x, positions, theta, rotary_dim):
    """Pairs (i, i + r/2) as complex numbers, turned by e^{i·p·θ^(−2i/r)}; the rest unchanged."""
    x = np.asarray(x, np.float64)
    half = rotary_dim // 2
    freq = theta ** (-np.arange(half) * 2.0 / rotary_dim)
    angle = np.asarray(positions, np.float64)[..., None] * freq  # [B, T, half]
    c = (x[..., :half] + 1j * x[..., half:rotary_dim]) * np.exp(1j * angle)[:, :, None, :]
    return np.concatenate([c.real, c.imag, x[..., rotary_dim:]], axis=-1)


@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_rope_matches_formula(rotary_dim):
    x = normal(0, (2, 5, 3, 8))
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions), theta=500.0, rotary_dim=rotary_dim)
    assert_close(out, np_rope(x, positions, 500.0, rotary_dim), F32_OUT, "rope")
    if rotary_dim < 8:  # partial rotary: the other channels pass through untouched
        np.testing.assert_array_equal(np.asarray(out)[..., rotary_dim:], x[..., rotary_dim:])


def test_rope_scores_depend_only_on_position_differences():
    q, k = normal(0, (1, 6, 2, 8)), normal(1, (1, 6, 2, 8))
    pos = np.arange(6)[None]

    def scores(offset):
        qr = np.asarray(apply_rope(jnp.asarray(q), jnp.asarray(pos + offset), rotary_dim=6), np.float64)
        kr = np.asarray(apply_rope(jnp.asarray(k), jnp.asarray(pos + offset), rotary_dim=6), np.float64)
        return np.einsum("bthd,bshd->bhts", qr, kr)

    base = scores(0)
    assert_close(scores(37), base, F32_OUT, "shifted by 37")
    # ... and they do depend on the difference: without rotation the scores differ.
    unrotated = np.einsum("bthd,bshd->bhts", np.float64(q), np.float64(k))
    assert np.abs(unrotated - base).max() > 0.1


def test_rope_rotary_dim_zero_is_identity():
    x = normal(0, (1, 4, 2, 8))
    np.testing.assert_array_equal(np.asarray(apply_rope(jnp.asarray(x), jnp.arange(4), rotary_dim=0)), x)


# ----------------------------------------------------------------------------- MLP, embedding


def test_swiglu():
    mlp = SwiGLU(8, 12, rngs=nnx.Rngs(0))
    x = normal(1, (2, 3, 8))
    wg, wu, wd = (np.asarray(p.kernel[...], np.float64) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    expected = (silu(x @ wg) * (x @ wu)) @ wd
    assert_close(mlp(jnp.asarray(x)), expected, F32_OUT, "swiglu")


@pytest.mark.parametrize("tie", [True, False])
def test_embedding_and_head(tie):
    emb = Embedding(11, 8, tie_output=tie, rngs=nnx.Rngs(0))
    table = np.asarray(emb.embedding[...], np.float64)
    tokens = np.array([[1, 4, 10], [0, 0, 3]])
    np.testing.assert_array_equal(np.asarray(emb(jnp.asarray(tokens))), table[tokens].astype(np.float32))
    x = normal(1, (2, 3, 8))
    logits = emb.logits(jnp.asarray(x))
    assert logits.dtype == jnp.float32
    head = table.T if tie else np.asarray(emb.head[...], np.float64)
    assert_close(logits, np.float64(x) @ head, F32_OUT, "logits")
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(emb, nnx.Param)))
    assert n_params == (11 * 8 if tie else 2 * 11 * 8)  # tied: one matrix serves both ends


# ----------------------------------------------------------------------------- cached attention


def test_masked_attention_blocks_equal_one_block():
    """A long cached prefill walks over query blocks; each block must give the same rows."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 10, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 13, 8)), jnp.float32)  # head-major [B, Hk, S, K]
    v = jnp.asarray(rng.standard_normal((2, 2, 13, 5)), jnp.float32)
    q_pos = jnp.arange(3, 13)
    k_pos = jnp.arange(13).at[0].set(-1)  # one empty slot
    q_doc = jnp.asarray([[0] * 4 + [1] * 6, [0] * 10])
    k_doc = jnp.asarray([[0] * 7 + [1] * 6, [0] * 13])
    kw = dict(scale=8**-0.5, window=5)
    whole = masked_attention(q, k, v, q_pos, q_doc, k_pos, k_doc, **kw)
    blocked = masked_attention(q, k, v, q_pos, q_doc, k_pos, k_doc, block_size=4, **kw)
    assert_close(blocked, whole, F32_OUT, "blocked")
    # Row 1, query at position 12 reads keys 8..12 only (window 5), all of document 0.
    s = np.einsum("d,sd->s", np.float64(q[1, 9, 0]), np.float64(k[1, 0, 8:13])) / np.sqrt(8)
    p = np.exp(s - s.max())
    assert_close(whole[1, 9, 0], (p / p.sum()) @ np.float64(v[1, 0, 8:13]), F32_OUT, "window row")


def _numpy_masked_attention(q, k, v, q_pos, q_doc, k_pos, k_doc, scale, window):
    """float64 loop: query t of row b, head j reads key s of kv head j // G when they share a
    document, 0 <= k_pos[s] <= q_pos[t] and q_pos[t] - k_pos[s] < window; no visible key: zeros."""
    q, k, v = (np.float64(x) for x in (q, k, v))
    b, t, h, _ = q.shape
    groups = h // k.shape[1]
    out = np.zeros((b, t, h, v.shape[3]))
    for bi in range(b):
        for ti in range(t):
            diff = q_pos[ti] - k_pos
            seen = (k_doc[bi] == q_doc[bi, ti]) & (k_pos >= 0) & (diff >= 0) & (diff < window)
            if not seen.any():
                continue
            for j in range(h):
                s = k[bi, j // groups][seen] @ q[bi, ti, j] * scale
                p = np.exp(s - s.max())
                out[bi, ti, j] = (p / p.sum()) @ v[bi, j // groups][seen]
    return out


@pytest.mark.parametrize("block_size", [None, 3])
def test_masked_attention_key_blocks_equal_the_float64_loop(block_size):
    """A prefill piece over a long cache walks over key blocks with an online softmax; blocks of
    4 slots over 13 (one padded) must give the loop's rows and the one-block gradients. Row 0's
    first query sees no key in its window and document, so it must stay zero."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 7, 4, 8)) * 2, jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 13, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 2, 13, 5)), jnp.float32)
    q_pos = jnp.arange(6, 13)
    k_pos = jnp.arange(13).at[2].set(-1)
    q_doc = jnp.asarray([[2] + [3] * 6, [0] * 7])
    k_doc = jnp.asarray([[0] * 6 + [2] * 1 + [3] * 6, [0] * 13]).at[0, 6].set(1)
    kw = dict(scale=8**-0.5, window=6, block_size=block_size)

    def run(q, k, v, key_block_size):
        return masked_attention(q, k, v, q_pos, q_doc, k_pos, k_doc, key_block_size=key_block_size, **kw)

    blocked = jax.jit(run, static_argnums=3)(q, k, v, 4)
    want = _numpy_masked_attention(q, k, v, np.asarray(q_pos), np.asarray(q_doc), np.asarray(k_pos),
                                   np.asarray(k_doc), kw["scale"], kw["window"])
    assert not want[0, 0].any()
    assert_close(blocked, want, F32_OUT, "key blocks")
    weights = jnp.asarray(rng.standard_normal(blocked.shape), jnp.float32)
    grads = [jax.grad(lambda *x: jnp.sum(run(*x, c) * weights), argnums=(0, 1, 2))(q, k, v) for c in (4, None)]
    for name, got, ref in zip("qkv", *grads):
        assert_close(got, ref, F32_GRAD, f"d{name}")


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_write_slot_writes_exactly_one_slot(slots):
    """write_slot rewrites a neighbour slot with its own value: every other slot must come back
    bit for bit, at every slot including both ends of the cache."""
    rng = np.random.default_rng(1)
    buf = jnp.asarray(rng.standard_normal((2, 3, slots, 4)), jnp.float32)
    new = jnp.asarray(rng.standard_normal((2, 3, 1, 4)), jnp.float32)
    write = jax.jit(write_slot)
    for slot in range(slots):
        expected = np.asarray(buf).copy()
        expected[:, :, slot] = np.asarray(new)[:, :, 0]
        np.testing.assert_array_equal(np.asarray(write(buf, new, jnp.int32(slot))), expected)


# ----------------------------------------------------------------------------- bad configurations

BAD_CONFIGS = [
    (lambda r: Attention(32, 4, n_kv_heads=3, rngs=r), "n_heads"),
    (lambda r: Attention(30, 4, rngs=r), "d_model"),
    (lambda r: Attention(32, 4, window=0, rngs=r), "window"),
    (lambda r: Attention(32, 4, rotary_dim=5, rngs=r), "rotary_dim"),
    (lambda r: Attention(32, 4, rotary_dim=10, rngs=r), "rotary_dim"),
    (lambda r: Mamba2(32, head_dim=24, rngs=r), "head_dim"),
    (lambda r: Mamba2(32, head_dim=16, n_groups=3, rngs=r), "n_groups"),
    (lambda r: Mamba2(32, dt_min=0.5, dt_max=0.1, rngs=r), "dt_min"),
    (lambda r: GatedDeltaNet(32, 4, n_v_heads=6, rngs=r), "n_v_heads"),
    (lambda r: GatedDeltaNet(32, 0, rngs=r), "n_heads"),
    (lambda r: GatedLinearAttention(32, 3, rngs=r), "d_model"),
    (lambda r: LightningAttention(32, 4, layer_idx=4, n_layers=4, rngs=r), "layer_idx"),
    (lambda r: LinearAttention(32, 4, feature_map="identity", rngs=r), "feature_map"),
    (lambda r: LinearAttention(32, 4, feature_map="softmax", normalize=False, rngs=r), "feature_map"),
    (lambda r: SwiGLU(32, -1, rngs=r), "d_ff"),
    (lambda r: RMSNorm(8, eps=0.0), "eps"),
    (lambda r: GatedRMSNorm(8, group_size=3), "group_size"),
]


@pytest.mark.parametrize("make, argument", BAD_CONFIGS)
def test_bad_configuration_raises_naming_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make(nnx.Rngs(0))


def test_init_cache_rejects_bad_sizes():
    layer = Attention(16, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        layer.init_cache(1, 0)


def test_lightning_decays():
    """ALiBi slopes 2^(−8h/H), h = 1..H, scaled by depth: the first layer decays fastest and the
    last hardly at all."""
    g0 = lightning_log_decay(4, 0, 3)
    np.testing.assert_allclose(g0, -(2.0 ** -np.array([2.0, 4.0, 6.0, 8.0])) * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(lightning_log_decay(4, 1, 3), g0 * (1 - 1 / (2 + 1e-5) + 1e-5) / (1 + 1e-5), rtol=1e-6)
    assert np.all(np.abs(lightning_log_decay(4, 2, 3)) < 1e-4)
