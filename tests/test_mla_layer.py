"""Multi-head latent attention (jaxlm.layers.mla): the expanded form against a float64 numpy MLA
and against transformers' DeepseekV3Attention / KimiLinearAttention; the latent cache's prefill
and absorbed decode against the full pass; packed documents; what the cache holds; bad arguments."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.layers.mla import LatentCache, MultiHeadLatentAttention
from kernels_pallas.call_layout import equations_outside_kernels
from numerics import F32_OUT, assert_close
from test_layer_mixers import apply

# Distinct sizes, so that a shape says which dimension it has: D, H, R (kv_lora_rank), Kn, P, V.
D, H, R, KN, P, V = 16, 3, 8, 5, 4, 7
B, T = 2, 7
EPS = 1e-6
THETA = 500.0


def make_layer(*, q_lora_rank=None, rope_layout="interleaved", rope_dim=P, seed=0):
    """An MLA layer with weights drawn large enough for peaked softmaxes and norm weights != 1."""
    layer = MultiHeadLatentAttention(
        D, H, kv_lora_rank=R, qk_nope_head_dim=KN, qk_rope_head_dim=rope_dim, v_head_dim=V,
        q_lora_rank=q_lora_rank, rope_theta=THETA, rope_layout=rope_layout, norm_eps=EPS, rngs=nnx.Rngs(seed),
    )
    state = nnx.state(layer, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(100 + seed)
    new = []
    for leaf in leaves:
        if leaf.ndim == 1:  # RMSNorm weights
            new.append(jnp.asarray(1.0 + 0.3 * rng.standard_normal(leaf.shape), leaf.dtype))
        else:
            new.append(jnp.asarray(rng.standard_normal(leaf.shape) * 1.2 / np.sqrt(leaf.shape[0]), leaf.dtype))
    nnx.update(layer, jax.tree.unflatten(treedef, new))
    return layer


def inputs(seed=1, batch=B, length=T):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, D)), jnp.float32)


# ----------------------------------------------------------------------------- numpy reference


def np_rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def np_rotate(x, positions, layout):
    """RoPE on the last axis of x [B, T, G, P] as complex pairs: (2i, 2i+1) for "interleaved",
    rotated in place; (i, i + P/2) for "half"; nothing for None."""
    p = x.shape[-1]
    if layout is None or p == 0:
        return x
    angle = positions[:, None] * THETA ** (-np.arange(p // 2) * 2.0 / p)  # [T, P/2]
    turn = np.exp(1j * angle)[None, :, None, :]
    out = np.empty_like(x)
    if layout == "interleaved":
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * turn
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        z = (x[..., : p // 2] + 1j * x[..., p // 2 :]) * turn
        out[..., : p // 2], out[..., p // 2 :] = z.real, z.imag
    return out


def np_latents(layer, x, positions):
    """(c_kv [B, T, R], k_rope [B, T, P]) of MLA in float64."""
    w = lambda m: np.asarray(m.kernel[...], np.float64)  # noqa: E731
    lat = np.asarray(x, np.float64) @ w(layer.kv_a_proj_with_mqa)
    c = np_rms(lat[..., :R], np.asarray(layer.kv_a_layernorm.weight[...], np.float64))
    k_rope = np_rotate(lat[..., None, R:], positions, layer.rope_layout)[:, :, 0]
    return c, k_rope


def np_mla(layer, x, segment_ids=None):
    """y [B, T, D]: MLA written out head by head, causal, documents kept apart, in float64."""
    w = lambda m: np.asarray(m.kernel[...], np.float64)  # noqa: E731
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    p = layer.qk_rope_head_dim
    if layer.q_lora_rank is None:
        q = x @ w(layer.q_proj)
    else:
        q = np_rms(x @ w(layer.q_a_proj), np.asarray(layer.q_a_layernorm.weight[...], np.float64)) @ w(layer.q_b_proj)
    q = q.reshape(b, t, H, KN + p)
    positions = np.arange(t, dtype=np.float64)
    c, k_rope = np_latents(layer, x, positions)
    kv = (c @ w(layer.kv_b_proj)).reshape(b, t, H, KN + V)
    k_nope, v = kv[..., :KN], kv[..., KN:]
    q_nope, q_rope = q[..., :KN], np_rotate(q[..., KN:], positions, layer.rope_layout)
    scores = np.einsum("bthn,bshn->bhts", q_nope, k_nope) + np.einsum("bthp,bsp->bhts", q_rope, k_rope)
    scores = scores * (KN + p) ** -0.5
    seg = np.zeros((b, t)) if segment_ids is None else np.asarray(segment_ids)
    visible = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])  # [B, T, S]
    scores = np.where(visible[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", probs, v).reshape(b, t, H * V)
    return o @ w(layer.o_proj)


LAYOUTS = [
    dict(rope_layout="interleaved"),  # DeepSeek-V3
    dict(rope_layout="half", q_lora_rank=6),
    dict(rope_layout=None),  # Kimi Linear: shared key channels, no rotation
    dict(rope_layout="interleaved", q_lora_rank=6, rope_dim=0),  # no shared rotary key at all
]


@pytest.mark.parametrize("config", LAYOUTS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_expanded_pass_matches_numpy_mla(config):
    layer = make_layer(**config)
    x = inputs()
    y, cache = apply(layer, x)
    assert cache is None
    assert_close(y, np_mla(layer, x), F32_OUT, "mla")


def test_rope_layouts_give_different_outputs():
    """Interleaved and rotate-half pair different channels: the reference above must tell them apart."""
    interleaved = make_layer(rope_layout="interleaved")
    half = make_layer(rope_layout="half")
    x = inputs()
    a, b = np.asarray(apply(interleaved, x)[0]), np.asarray(apply(half, x)[0])
    assert np.abs(a - b).max() > 1e-2
    assert_close(b, np_mla(half, x), F32_OUT, "half")


# ----------------------------------------------------------------------------- transformers


HF_CASES = [
    ("DeepseekV3", dict(rope_interleave=True), dict(q_lora_rank=6, rope_layout="interleaved")),
    ("DeepseekV3", dict(rope_interleave=False), dict(rope_layout="half")),
    ("KimiLinear", dict(), dict(rope_layout=None)),
]


@pytest.mark.parametrize("family,hf_kwargs,kwargs", HF_CASES, ids=["v3-interleaved-qlora", "v3-half", "kimi-nope"])
def test_matches_transformers(family, hf_kwargs, kwargs):
    """The parameters map one to one onto transformers' (weight = kernel.T) and give its outputs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    layer = make_layer(**kwargs)
    common = dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=H, kv_lora_rank=R,
                  qk_nope_head_dim=KN, qk_rope_head_dim=P, v_head_dim=V, q_lora_rank=kwargs.get("q_lora_rank"))
    if family == "DeepseekV3":
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_module

        config = transformers.DeepseekV3Config(rope_parameters=dict(rope_type="default", rope_theta=THETA),
                                               **hf_kwargs, **common)
        config._attn_implementation = "eager"
        hf = hf_module.DeepseekV3Attention(config, 0)
    else:
        from transformers.models.kimi_linear import modeling_kimi_linear as hf_module

        config = transformers.KimiLinearConfig(**common)
        config._attn_implementation = "eager"
        hf = hf_module.KimiLinearAttention(config, 0)
    ours = {}
    for name, module in vars(layer).items():
        if module is None or not isinstance(module, nnx.Module):
            continue
        leaf = module.kernel[...].T if hasattr(module, "kernel") else module.weight[...]
        ours[f"{name}.weight"] = torch.tensor(np.asarray(leaf))
    assert set(ours) == {name for name, _ in hf.named_parameters()}
    hf.load_state_dict(ours)

    x = inputs()
    xt = torch.tensor(np.asarray(x))
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        if family == "DeepseekV3":
            rotary = hf_module.DeepseekV3RotaryEmbedding(config)
            expected = hf(xt, rotary(xt, torch.arange(T)[None].expand(B, T)), mask)[0]
        else:
            expected = hf(xt, mask)[0]
    assert_close(apply(layer, x)[0], expected.numpy(), F32_OUT, family)


# ----------------------------------------------------------------------------- latent cache


CACHE_CASES = [
    dict(rope_layout="interleaved"),
    dict(rope_layout="interleaved", q_lora_rank=6),
    dict(rope_layout=None),
    dict(rope_layout=None, q_lora_rank=6, rope_dim=0),
]


@pytest.mark.parametrize("config", CACHE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_prefill_then_absorbed_decode_matches_full_pass(config):
    """Prefill 3 tokens, prefill 2 more onto the cache, then decode 2 one at a time: the outputs
    are those of one full pass, and the cache holds the reference's latents."""
    layer = make_layer(**config)
    x = inputs()
    full, _ = apply(layer, x)
    cache = layer.init_cache(B, T + 4)  # empty slots beyond the tokens must stay unread
    outs = []
    for lo, hi in [(0, 3), (3, 5), (5, 6), (6, 7)]:
        y, cache = apply(layer, x[:, lo:hi], cache=cache)
        outs.append(y)
    assert_close(jnp.concatenate(outs, axis=1), full, F32_OUT, "cached")
    assert int(cache.pos) == T
    c, k_rope = np_latents(layer, x, np.arange(T, dtype=np.float64))
    if layer.rope_layout == "interleaved":  # cached as transformers returns it: rotated evens, then odds
        k_rope = np.concatenate([k_rope[..., 0::2], k_rope[..., 1::2]], axis=-1)
    assert_close(cache.c_kv[:, :T], c, F32_OUT, "c_kv")
    assert_close(cache.k_rope[:, :T], k_rope, F32_OUT, "k_rope")
    np.testing.assert_array_equal(np.asarray(cache.c_kv[:, T:]), 0.0)


def test_decode_step_never_expands_the_cache():
    """The absorbed step reads c_kv and k_rope as they are: no array the step builds over the L
    slots is bigger than the latent cache itself (expanded keys would be B·L·H·(Kn + P))."""
    layer = make_layer()
    slots = 11
    _, cache = apply(layer, inputs()[:, :3], cache=layer.init_cache(B, slots))
    graphdef, state = nnx.split(layer)

    def step(state, x_t, cache):
        return nnx.merge(graphdef, state)(x_t, cache=cache)

    jaxpr = jax.make_jaxpr(step)(state, inputs(seed=4, length=1), cache)
    over_slots = [
        v.aval.shape for eqn in equations_outside_kernels(jaxpr) for v in eqn.outvars
        if slots in getattr(v.aval, "shape", ())
    ]
    assert over_slots, "the step must read the cache"
    assert max(int(np.prod(s)) for s in over_slots) <= B * slots * R, over_slots
    # The prefill form, by contrast, does expand: the bound above is one the expansion breaks.
    assert B * slots * H * (KN + P) > B * slots * R


@pytest.mark.parametrize("rope_dim", [P, 0])
def test_cache_holds_only_the_latents(rope_dim):
    layer = make_layer(rope_dim=rope_dim)
    slots = 9
    cache = layer.init_cache(B, slots)
    assert isinstance(cache, LatentCache)
    floats = [x for x in jax.tree.leaves(cache) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sum(x.size for x in floats) == B * slots * (R + rope_dim)
    assert cache.c_kv.shape == (B, slots, R) and cache.k_rope.shape == (B, slots, rope_dim)
    _, cache = apply(layer, inputs()[:, :3], cache=cache)
    _, cache = apply(layer, inputs()[:, 3:4], cache=cache)
    floats = [x for x in jax.tree.leaves(cache) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sum(x.size for x in floats) == B * slots * (R + rope_dim)
    # The rest is int32 bookkeeping: a document per slot and per row, the position, the last bad one.
    ints = [x for x in jax.tree.leaves(cache) if not jnp.issubdtype(x.dtype, jnp.floating)]
    assert all(x.dtype == jnp.int32 for x in ints) and sum(x.size for x in ints) == B * slots + 2 * B + 1


# ----------------------------------------------------------------------------- packed documents


def test_packed_documents_equal_separate_runs():
    """Documents of different lengths, boundaries at different places in the two rows (row 1's
    ids are not sorted): each document's outputs are those of the reference run on it alone."""
    layer = make_layer(q_lora_rank=6)
    x = inputs(length=9)
    segment_ids = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1, 1], [4, 4, 2, 2, 2, 2, 2, 7, 7]])
    y, _ = apply(layer, x, segment_ids)
    for row, cuts in ((0, [0, 4, 9]), (1, [0, 2, 7, 9])):
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            alone = np_mla(layer, x[row : row + 1, lo:hi])
            assert_close(y[row : row + 1, lo:hi], alone, F32_OUT, f"row {row} [{lo}:{hi}]")
    # ... and without segment_ids the documents do mix.
    assert np.abs(np.asarray(apply(layer, x)[0][0, 4:]) - np.asarray(y[0, 4:])).max() > 1e-2


def test_left_padded_prefill_and_decode_never_read_the_padding():
    """Row 1's prompt is left-padded with its own document, whose inputs are NaN: the prefill and
    the absorbed decode steps give the reference's outputs for each row's own tokens, finite."""
    layer = make_layer()
    x = inputs(length=6)
    pad = 2
    padded = jnp.concatenate([jnp.full((1, pad, D), jnp.nan), x[1:, : 6 - pad]], axis=1)
    batch = jnp.concatenate([x[:1], padded], axis=0)
    segment_ids = jnp.asarray([[0] * 6, [0] * pad + [1] * (6 - pad)])
    y, cache = apply(layer, batch, segment_ids, layer.init_cache(2, 10))
    steps = inputs(seed=5, length=3)
    outs = []
    for i in range(3):
        y_t, cache = apply(layer, steps[:, i : i + 1], cache=cache)
        outs.append(y_t)
    decoded = jnp.concatenate(outs, axis=1)

    assert np.isnan(np.asarray(y[1, :pad])).all()  # the padding's own outputs carry its NaN
    for row, prompt in ((0, x[:1]), (1, x[1:, : 6 - pad])):
        alone = np_mla(layer, jnp.concatenate([prompt, steps[row : row + 1]], axis=1))
        n = prompt.shape[1]
        assert_close(y[row : row + 1, -n:], alone[:, :n], F32_OUT, f"prefill row {row}")
        assert_close(decoded[row : row + 1], alone[:, n:], F32_OUT, f"decode row {row}")


def test_nonfinite_latent_reaches_its_own_document_only():
    """A NaN token in the cache turns its document's later outputs NaN in the decode step too."""
    layer = make_layer()
    x = inputs(length=4).at[0, 1].set(jnp.nan)
    _, cache = apply(layer, x, cache=layer.init_cache(B, 6))
    y, _ = apply(layer, inputs(seed=6, length=1), cache=cache)
    assert np.isnan(np.asarray(y[0])).all()
    assert np.isfinite(np.asarray(y[1])).all()


# ----------------------------------------------------------------------------- bad arguments


def build(**overrides):
    kwargs = dict(kv_lora_rank=R, qk_nope_head_dim=KN, qk_rope_head_dim=P, v_head_dim=V, rngs=nnx.Rngs(0))
    kwargs.update(overrides)
    return MultiHeadLatentAttention(D, H, **kwargs)


BAD_ARGS = [
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
    (dict(qk_rope_head_dim=5, rope_layout="half"), "qk_rope_head_dim"),
    (dict(qk_rope_head_dim=-2), "qk_rope_head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(qk_nope_head_dim=0), "qk_nope_head_dim"),
    (dict(v_head_dim=-1), "v_head_dim"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(rope_layout="pairs"), "rope_layout"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(norm_eps=-1e-6), "norm_eps"),
    (dict(softmax_scale=0.0), "softmax_scale"),
]


@pytest.mark.parametrize("overrides,argument", BAD_ARGS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD_ARGS)])
def test_bad_configuration_raises_naming_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        build(**overrides)


def test_odd_unrotated_rope_dim_is_allowed():
    """Without rotation the shared key channels need no pairs: P = 3 builds and runs."""
    layer = build(qk_rope_head_dim=3, rope_layout=None)
    assert layer.kv_a_proj_with_mqa.kernel[...].shape == (D, R + 3)
    y, _ = apply(layer, inputs())
    assert_close(y, np_mla(layer, inputs()), F32_OUT, "odd P")


def test_bad_cache_and_sizes_raise():
    layer = build()
    with pytest.raises(ValueError, match="batch_size"):
        layer.init_cache(0, 4)
    with pytest.raises(ValueError, match="max_len"):
        layer.init_cache(2, -1)
    other = build(kv_lora_rank=R + 2).init_cache(B, 4)
    with pytest.raises(ValueError, match="cache.c_kv"):
        layer(inputs(length=1), cache=other)
