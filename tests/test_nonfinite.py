"""A NaN or Inf in one token reaches only what that token causally reaches, in every registered
form of every recurrence, forward and backward: outputs before it, and in other documents, are
finite and equal to the clean run's, and so are the gradients of a loss over those outputs."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ops
from jaxlm.ops.attention import ATTENTION_FORMS
from numerics import F32_GRAD, F32_OUT, assert_close
from op_cases import RECURRENCES, make_inputs

SHAPE = B, T, H, HV, K, V = 2, 24, 1, 2, 8, 8
# Row 0 holds two documents, row 1 one. The bad value sits in row 0 at token BAD, in document 0.
SEGMENTS = np.array([[0] * 10 + [1] * 14, [2] * 24], np.int32)
BAD, DOC_END = 6, 10


def inputs(seed: int = 0) -> dict[str, jax.Array]:
    return {n: jnp.asarray(a) for n, a in make_inputs(SHAPE, seed).items()}


# The outputs the bad token cannot reach: before it in its document, its other document, row 1.
CLEAN = np.ones((B, T), bool)
CLEAN[0, BAD:DOC_END] = False


@functools.cache
def run(op: str, impl: str):
    """jit of (o, S, d loss/d inputs) for a loss over the clean outputs and the final state."""
    rec = RECURRENCES[op]

    def loss(x):
        o, s = rec.call(x, impl=impl, chunk_size=8, initial_state=x["s0"], output_final_state=True,
                        segment_ids=SEGMENTS)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        kept = jnp.where(CLEAN[:, :, None, None], o * w, 0.0)
        return jnp.sum(kept) + jnp.sum(jnp.sin(s)), (o, s)

    def fn(x):
        (_, (o, s)), grads = jax.value_and_grad(loss, has_aux=True)(x)
        return o, s, {n: grads[n] for n in rec.reads}

    return jax.jit(fn)


def clean_tokens(grad: np.ndarray, name: str) -> np.ndarray:
    """The entries of an input's gradient that belong to clean tokens (or the whole of s0)."""
    return grad if name == "s0" else grad[CLEAN]


@pytest.mark.parametrize("op, impl", [(op, form) for op, rec in RECURRENCES.items() for form in rec.table.names])
def test_a_bad_value_stays_where_it_falls(op, impl):
    x = inputs()
    o_ref, s_ref, g_ref = run(op, impl)(x)
    for name in (n for n in RECURRENCES[op].reads if n != "s0"):
        for bad in (np.nan, np.inf):
            where = (0, BAD, 0, 1) if x[name].ndim == 4 else (0, BAD, 1)
            poisoned = {**x, name: x[name].at[where].set(bad)}
            o, s, grads = run(op, impl)(poisoned)
            what = f"{op} {impl} {name}={bad}"
            assert_close(np.asarray(o)[CLEAN], np.asarray(o_ref)[CLEAN], F32_OUT, f"{what}: clean outputs")
            assert_close(s, s_ref, F32_OUT, f"{what}: final states")
            for n in grads:
                assert_close(clean_tokens(np.asarray(grads[n]), n), clean_tokens(np.asarray(g_ref[n]), n),
                             F32_GRAD, f"{what}: d{n} of clean tokens")
            # The value is not lost: the bad token's own output is NaN in the heads it feeds.
            assert np.isnan(np.asarray(o)[0, BAD]).any(), f"{what}: the bad value vanished"


def test_a_bad_value_reaches_the_rest_of_its_document_and_the_final_state():
    x = inputs(1)
    segments = np.zeros((B, T), np.int32)
    bad_k = x["k"].at[0, BAD].set(jnp.nan)
    o, s = ops.gated_delta_rule(x["q"], bad_k, x["v"], x["g"], x["beta"], segment_ids=segments,
                                output_final_state=True)
    o, s = np.asarray(o), np.asarray(s)
    assert np.isnan(o[0, BAD:]).all() and np.isfinite(o[0, :BAD]).all() and np.isfinite(o[1]).all()
    assert np.isnan(s[0]).all() and np.isfinite(s[1]).all()
    # A bad query reaches its own output only.
    bad_q = x["q"].at[0, BAD].set(jnp.inf)
    o, s = ops.simple_gla(bad_q, x["k"], x["v"], x["g"], segment_ids=segments, output_final_state=True)
    o, s = np.asarray(o), np.asarray(s)
    assert np.isnan(o[0, BAD]).all() and np.isfinite(np.delete(o[0], BAD, axis=0)).all() and np.isfinite(s).all()


def test_minus_infinity_is_a_gate_value_not_a_bad_one():
    """g = −inf is an exact reset: nothing is poisoned."""
    x = inputs(2)
    g = x["g"].at[0, BAD].set(-jnp.inf)
    o, s = ops.gated_delta_rule(x["q"], x["k"], x["v"], g, x["beta"], output_final_state=True)
    o_ref, s_ref = ops.gated_delta_rule(x["q"], x["k"], x["v"], g, x["beta"], output_final_state=True,
                                        impl="recurrent")
    chex.assert_tree_all_finite(o)
    assert_close((o, s), (o_ref, s_ref), F32_OUT, "reset")


# ------------------------------------------------------------------ attention, cached attention, conv


def attention_inputs(seed: int = 3):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, 4, K))
    k, v = rng.normal(size=(B, T, 2, K)), rng.normal(size=(B, T, 2, V))
    return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v))


@functools.cache
def attention_fn(impl: str, window: int | None):
    def loss(q, k, v):
        o = ops.attention(q, k, v, window=window, segment_ids=SEGMENTS, impl=impl)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        return jnp.sum(jnp.where(CLEAN[:, :, None, None], o * w, 0.0)), o

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("impl", ATTENTION_FORMS.names)
@pytest.mark.parametrize("window", [None, 3])
def test_attention_confines_a_bad_value(impl, window):
    q, k, v = attention_inputs()
    (_, o_ref), g_ref = attention_fn(impl, window)(q, k, v)
    for i, name in enumerate("qkv"):
        for bad in (np.nan, np.inf):
            args = [q, k, v]
            args[i] = args[i].at[0, BAD, 0, 1].set(bad)
            (_, o), grads = attention_fn(impl, window)(*args)
            what = f"attention {impl} window={window} {name}={bad}"
            o, o_ref_np = np.asarray(o), np.asarray(o_ref)
            assert_close(o[CLEAN], o_ref_np[CLEAN], F32_OUT, what)
            for n, g, r in zip("qkv", grads, g_ref):
                assert_close(np.asarray(g)[CLEAN], np.asarray(r)[CLEAN], F32_GRAD, f"{what}: d{n}")
            # Query head 0 (and 1, which reads kv head 0) at the bad token comes out NaN; a window of 3
            # keeps a bad key from tokens 3 and more after it.
            assert np.isnan(o[0, BAD, 0]).all(), what
            if name != "q" and window == 3:
                assert np.isnan(o[0, BAD + 2, :2]).all() and np.isfinite(o[0, BAD + 3]).all(), what


def test_cached_attention_remembers_a_bad_key_and_forgets_it_with_its_document():
    """Prefill 8 tokens whose token 3 has a NaN value, then decode: the rest of the document reads
    it (NaN), a window of 4 lets it fall out, and a new document starts clean."""
    q, k, v = attention_inputs(4)
    v = v.at[0, 3, 0, 0].set(jnp.nan)
    for window, clean_from in ((None, None), (4, 7)):
        cache = ops.KVCache.empty(B, 2, 16, K, V, jnp.float32)
        o, cache = ops.cached_attention(q[:, :8], k[:, :8], v[:, :8], cache, window=window)
        o = np.asarray(o)
        assert np.isfinite(o[0, :3]).all() and np.isfinite(o[1]).all()
        assert np.isnan(o[0, 3:7, :2]).all() and np.isfinite(o[0, 3:, 2:]).all()  # kv head 0 only
        if clean_from is not None:
            assert np.isfinite(o[0, clean_from:]).all()
        step, cache = ops.cached_attention(q[:, 8:9], k[:, 8:9], v[:, 8:9], cache, window=window)
        assert np.isnan(np.asarray(step)[0, 0, :2]).all() == (window is None)
        # A call's first token continues the cached document; row 0's second token starts a new one.
        new_doc = jnp.asarray([[0, 1], [0, 0]], jnp.int32)
        two, _ = ops.cached_attention(q[:, 9:11], k[:, 9:11], v[:, 9:11], cache, window=window,
                                      segment_ids=new_doc)
        assert np.isfinite(np.asarray(two)[0, 1]).all() and np.isfinite(np.asarray(two)[1]).all()


def test_conv_confines_a_bad_input():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(B, T, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

    def loss(x, w):
        y, state = ops.causal_conv1d(x, w, segment_ids=SEGMENTS, output_final_state=True)
        return jnp.sum(jnp.where(CLEAN[:, :, None], y * jnp.cos(y), 0.0)), (y, state)

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y_ref, _)), (dx_ref, dw_ref) = run(x, w)
    (_, (y, state)), (dx, dw) = run(x.at[0, BAD, 2].set(jnp.nan), w)
    y = np.asarray(y)
    assert_close(y[CLEAN], np.asarray(y_ref)[CLEAN], F32_OUT, "conv outputs")
    assert np.isnan(y[0, BAD : BAD + 4, 2]).all() and np.isfinite(np.delete(y[0], 2, axis=-1)).all()
    assert_close(np.asarray(dx)[CLEAN], np.asarray(dx_ref)[CLEAN], F32_GRAD, "dx")
    assert_close(dw, dw_ref, F32_GRAD, "dw")
    assert np.isfinite(np.asarray(state)).all()  # the bad input left the last window
