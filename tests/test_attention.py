"""Softmax attention against the independent float64 reference of op_cases, with and without jit.

Every output test runs twice: with the default query block (tiny shapes take the one-shot path)
and with 4-row query blocks, so the blocked path is exercised, including T not a multiple of
the block.
"""

from __future__ import annotations

import functools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxlm import ops
from jaxlm.ops.attention import xla as attention_xla
from numerics import BF16_GRAD, BF16_OUT, F32_GRAD, F32_OUT, assert_close
from op_cases import attention_formula, attention_mask, attention_reference, make_qkv, normal, segments_from_lengths

QUERY_BLOCKS = {"one_shot": None, "blocks_of_4": 4}


@pytest.fixture(params=list(QUERY_BLOCKS.values()), ids=list(QUERY_BLOCKS))
def block(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(attention_xla, "QUERY_BLOCK", request.param)
    return request.param


# (causal, window, B, T, S, H, Hk, D, Dv, scale)
CASES = {
    "causal": (True, None, 2, 8, 8, 2, 2, 16, 16, None),
    "causal_gqa_odd_t": (True, None, 1, 13, 13, 4, 2, 24, 8, None),
    "causal_window": (True, 3, 2, 11, 11, 4, 1, 12, 12, 0.3),
    "causal_window_1": (True, 1, 1, 6, 6, 2, 2, 8, 8, None),
    "full": (False, None, 2, 7, 7, 4, 2, 12, 20, None),
    "full_window": (False, 2, 1, 9, 9, 2, 1, 10, 6, None),
    "cross": (False, None, 2, 9, 5, 4, 4, 8, 8, None),
    "cross_window_empty_rows": (False, 3, 1, 10, 4, 2, 1, 8, 8, None),
}


class ReferenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters((f"{case}_{block}", case, block) for case in CASES for block in QUERY_BLOCKS)
    def test_matches_reference(self, case, block):
        causal, window, b, t, s, h, hk, d, dv, scale = CASES[case]
        if QUERY_BLOCKS[block] is not None:
            self.enter_context(mock.patch.object(attention_xla, "QUERY_BLOCK", QUERY_BLOCKS[block]))
        q, k, v = make_qkv(0, b, t, s, h, hk, d, dv)
        o = self.variant(functools.partial(ops.attention, causal=causal, window=window, scale=scale))(q, k, v)
        chex.assert_shape(o, (b, t, h, dv))
        chex.assert_type(o, jnp.float32)
        expected = attention_reference(q, k, v, attention_mask(t, s, causal=causal, window=window, batch=b), scale)
        assert_close(o, expected, F32_OUT, "o")


@pytest.mark.parametrize("causal,window", [(True, None), (True, 2), (False, None), (False, 3)])
def test_segments_equal_separate_runs(causal, window, block):
    lengths = [[3, 5, 1, 4], [6, 7]]
    seg = segments_from_lengths(lengths)
    q, k, v = make_qkv(1, 2, 13, 13, 4, 2, 12, 8)
    o = ops.attention(q, k, v, causal=causal, window=window, segment_ids=seg)
    for row, docs in enumerate(lengths):
        start = 0
        for n in docs:
            part = slice(start, start + n)
            alone = ops.attention(
                q[row : row + 1, part], k[row : row + 1, part], v[row : row + 1, part], causal=causal, window=window
            )
            assert_close(o[row : row + 1, part], alone, F32_OUT, f"row {row} doc at {start}")
            start += n
    mask = attention_mask(13, 13, causal=causal, window=window, segment_ids=seg, batch=2)
    assert_close(o, attention_reference(q, k, v, mask), F32_OUT, "o vs reference")


def test_segment_ids_repeated_nonadjacent_ids_are_separate_documents():
    # As in the recurrences, a document is a run of equal ids: the id 0 that comes back is new.
    seg = jnp.asarray([[0, 0, 1, 1, 0, 0]], jnp.int32)
    q, k, v = make_qkv(2, 1, 6, 6, 2, 2, 8, 8)
    o = ops.attention(q, k, v, causal=False, segment_ids=seg)
    mask = attention_mask(6, 6, causal=False, window=None, segment_ids=seg)
    assert not mask[0, 0, 4]
    assert_close(o, attention_reference(q, k, v, mask), F32_OUT, "o")


GRAD_CASES = {
    "causal_gqa": (True, None, None, 11, 4, 2),
    "causal_window_segments": (True, 3, [[4, 7], [2, 9]], 11, 2, 2),
    "full_window_segments": (False, 2, [[5, 6], [11]], 11, 4, 1),
}


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients_match_unblocked_formula(case, block):
    causal, window, lengths, t, h, hk = case
    b = 2
    seg = None if lengths is None else segments_from_lengths(lengths)
    q, k, v = make_qkv(3, b, t, t, h, hk, 12, 10)
    ct = normal(4, (b, t, h, 10))
    mask = jnp.asarray(attention_mask(t, t, causal=causal, window=window, segment_ids=seg, batch=b))

    def loss_op(q, k, v):
        return jnp.sum(ops.attention(q, k, v, causal=causal, window=window, segment_ids=seg) * ct)

    def loss_ref(q, k, v):
        return jnp.sum(attention_formula(q, k, v, mask) * ct)

    got = jax.jit(jax.grad(loss_op, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(q, k, v)
    assert_close(got, want, F32_GRAD, "dq, dk, dv")


def test_blocked_path_under_jit_matches_one_shot():
    # Direct call with a block size that does not divide T: 3 blocks of 5 rows for T=13.
    q, k, v = make_qkv(5, 1, 13, 13, 4, 2, 8, 8)
    kwargs = dict(causal=True, scale=8**-0.5, window=None, segment_ids=None)
    blocked = jax.jit(lambda q, k, v: attention_xla.attention_xla(q, k, v, block_size=5, **kwargs))(q, k, v)
    one_shot = attention_xla.attention_xla(q, k, v, block_size=64, **kwargs)
    assert_close(blocked, one_shot, F32_OUT, "o")


def test_bf16_inputs(block):
    seg = segments_from_lengths([[4, 7]])
    q, k, v = make_qkv(6, 1, 11, 11, 4, 2, 16, 16, jnp.bfloat16)
    o = ops.attention(q, k, v, window=5, segment_ids=seg)
    assert o.dtype == jnp.bfloat16
    mask = attention_mask(11, 11, causal=True, window=5, segment_ids=seg)
    assert_close(o, attention_reference(q, k, v, mask), BF16_OUT, "o")

    ct = normal(7, o.shape)
    grads = jax.grad(lambda *a: jnp.sum(ops.attention(*a, window=5, segment_ids=seg) * ct), argnums=(0, 1, 2))(q, k, v)
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    want = jax.grad(lambda *a: jnp.sum(attention_formula(*a, jnp.asarray(mask)) * ct), argnums=(0, 1, 2))(*f32)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    assert_close(grads, want, BF16_GRAD, "dq, dk, dv")


def test_queries_without_keys_give_zeros_and_finite_gradients(block):
    # Non-causal cross attention with a window: queries t >= S + window - 1 see no key.
    q, k, v = make_qkv(8, 1, 10, 4, 2, 1, 8, 8)
    o = ops.attention(q, k, v, causal=False, window=2)
    np.testing.assert_array_equal(np.asarray(o[:, 5:]), 0.0)
    grads = jax.grad(lambda *a: jnp.sum(ops.attention(*a, causal=False, window=2) ** 2), argnums=(0, 1, 2))(q, k, v)
    chex.assert_tree_all_finite(grads)
    assert np.all(np.asarray(grads[0][:, 5:]) == 0.0)


def test_huge_scores_stay_finite(block):
    seg = segments_from_lengths([[3, 6]])
    q, k, v = make_qkv(9, 1, 9, 9, 2, 2, 8, 8)
    o = ops.attention(q, k, v, scale=300.0, window=4, segment_ids=seg)
    mask = attention_mask(9, 9, causal=True, window=4, segment_ids=seg)
    assert_close(o, attention_reference(q, k, v, mask, 300.0), F32_OUT, "o")
    grads = jax.grad(lambda *a: jnp.sum(ops.attention(*a, scale=300.0, window=4, segment_ids=seg)), argnums=(0, 1, 2))(
        q, k, v
    )
    chex.assert_tree_all_finite(grads)


def test_impl_xla_and_jit_agree_with_default():
    q, k, v = make_qkv(10, 1, 7, 7, 2, 1, 8, 8)
    o = ops.attention(q, k, v, window=3)
    o_xla = ops.attention(q, k, v, window=3, impl="xla")
    o_jit = jax.jit(lambda q, k, v: ops.attention(q, k, v, window=3))(q, k, v)
    np.testing.assert_array_equal(np.asarray(o_xla), np.asarray(o))
    assert_close(o_jit, o, F32_OUT, "jit")


q4 = jnp.zeros((1, 6, 4, 8))
kv2 = jnp.zeros((1, 6, 2, 8))
ERRORS = {
    "unknown_impl": (dict(impl="cuda"), "impl must be None, one of"),
    "window_zero": (dict(window=0), "window"),
    "window_negative": (dict(window=-2), "window"),
    "window_float": (dict(window=2.5), "window"),
    "window_bool": (dict(window=True), "window"),
    "causal_not_bool": (dict(causal="yes"), "causal"),
    "scale_array": (dict(scale=jnp.ones(2)), "scale"),
    "causal_cross": (dict(k=jnp.zeros((1, 5, 2, 8)), v=jnp.zeros((1, 5, 2, 8))), "S=5"),
    "segments_cross": (dict(causal=False, k=jnp.zeros((1, 5, 2, 8)), v=jnp.zeros((1, 5, 2, 8)),
                            segment_ids=jnp.zeros((1, 6), jnp.int32)), "segment_ids"),
    "heads": (dict(k=jnp.zeros((1, 6, 3, 8)), v=jnp.zeros((1, 6, 3, 8))), "multiple"),
    "head_dim": (dict(k=jnp.zeros((1, 6, 2, 4))), "D=8"),
    "v_len": (dict(v=jnp.zeros((1, 5, 2, 8))), "v must have shape"),
    "q_rank": (dict(q=jnp.zeros((6, 4, 8))), "q must have shape"),
    "q_int": (dict(q=jnp.zeros((1, 6, 4, 8), jnp.int32)), "floating"),
    "segments_shape": (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), "segment_ids must have shape"),
    "segments_float": (dict(segment_ids=jnp.zeros((1, 6))), "integer"),
}


CACHED_ERRORS = {
    "new_tokens": (dict(k=jnp.zeros((1, 5, 2, 8)), v=jnp.zeros((1, 5, 2, 8))), "same T=6 new tokens as q, got S=5"),
    "heads": (dict(k=jnp.zeros((1, 6, 3, 8)), v=jnp.zeros((1, 6, 3, 8))), "multiple"),
    "v_len": (dict(v=jnp.zeros((1, 5, 2, 8))), "v must have shape"),
    "q_int": (dict(q=jnp.zeros((1, 6, 4, 8), jnp.int32)), "floating"),
    "cache_heads": (dict(cache=ops.KVCache.empty(1, 3, 16, 8, 8, jnp.float32)), r"cache.k must have shape \[B=1, Hk=2"),
    "window_zero": (dict(window=0), "window"),
}


@pytest.mark.parametrize("kwargs,match", CACHED_ERRORS.values(), ids=CACHED_ERRORS.keys())
def test_cached_attention_bad_arguments_raise(kwargs, match):
    args = {**dict(q=q4, k=kv2, v=kv2, cache=ops.KVCache.empty(1, 2, 16, 8, 8, jnp.float32)), **kwargs}
    with pytest.raises(ValueError, match=match):
        ops.cached_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cache"), **args)


@pytest.mark.parametrize("kwargs,match", ERRORS.values(), ids=ERRORS.keys())
def test_bad_arguments_raise(kwargs, match):
    args, kwargs = dict(q=q4, k=kv2, v=kv2), dict(kwargs)
    for name in ("q", "k", "v"):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    with pytest.raises(ValueError, match=match):
        ops.attention(args["q"], args["k"], args["v"], **kwargs)
