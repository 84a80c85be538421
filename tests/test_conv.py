"""causal_conv1d against a naive numpy loop and, for gradients, against lax's grouped conv."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ops
from numerics import BF16_OUT, F32_GRAD, F32_OUT, assert_close


def normal(seed, shape, dtype=jnp.float32):
    # numpy draws: eager jax.random would compile anew for every test shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def reference(x, weight, bias=None, activation="silu", initial_state=None):
    """Loops straight from the definition, in float64. Returns (y, final state)."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    b, t, d = x.shape
    w = weight.shape[1]
    init = np.zeros((b, w - 1, d)) if initial_state is None else np.asarray(initial_state, np.float64)

    def x_at(bi, pos):  # x_pos, with pos < 0 read from the state (oldest first)
        return x[bi, pos] if pos >= 0 else init[bi, pos + w - 1]

    y = np.zeros((b, t, d))
    for bi in range(b):
        for ti in range(t):
            acc = np.zeros(d) if bias is None else np.asarray(bias, np.float64).copy()
            for i in range(w):
                acc += weight[:, i] * x_at(bi, ti - (w - 1) + i)
            y[bi, ti] = acc
    if activation in ("silu", "swish"):
        y = y / (1 + np.exp(-y))
    state = np.zeros((b, w - 1, d))
    for bi in range(b):
        for j, pos in enumerate(range(t - (w - 1), t)):
            state[bi, j] = x_at(bi, pos)
    return y, state


def lax_formula(x, weight, bias, initial_state):
    """The same conv through lax's grouped convolution (cross-correlation), float32, silu."""
    d = x.shape[2]
    xp = jnp.concatenate([initial_state, x], axis=1)
    y = jax.lax.conv_general_dilated(
        jnp.swapaxes(xp, 1, 2), weight[:, None, :], (1,), "VALID", feature_group_count=d, precision="highest"
    )
    return jax.nn.silu(jnp.swapaxes(y, 1, 2) + bias)


def inputs(seed, b=2, t=9, d=6, w=4):
    return normal(seed, (b, t, d)), normal(seed + 1, (d, w)), normal(seed + 2, (d,)), normal(seed + 3, (b, w - 1, d))


@pytest.mark.parametrize("w", [1, 2, 4])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
def test_matches_reference(w, use_bias, activation):
    x, weight, bias, s0 = inputs(0, w=w)
    bias = bias if use_bias else None
    y, state = ops.causal_conv1d(x, weight, bias, activation=activation, output_final_state=True)
    y_ref, state_ref = reference(x, weight, bias, activation)
    assert y.dtype == jnp.float32 and state.dtype == jnp.float32 and state.shape == (2, w - 1, 6)
    assert_close(y, y_ref, F32_OUT, "y")
    assert_close(state, state_ref, F32_OUT, "state")
    no_state = ops.causal_conv1d(x, weight, bias, activation=activation)[1]
    assert no_state is None


@pytest.mark.parametrize("t", [2, 9])  # T=2 < W-1: the final state keeps a slot of initial_state
def test_initial_state(t):
    x, weight, bias, s0 = inputs(1, t=t)
    y, state = ops.causal_conv1d(x, weight, bias, initial_state=s0, output_final_state=True)
    y_ref, state_ref = reference(x, weight, bias, "silu", s0)
    assert_close(y, y_ref, F32_OUT, "y")
    assert_close(state, state_ref, F32_OUT, "state")


@pytest.mark.parametrize("split", [1, 2, 5])
def test_state_chaining(split):
    x, weight, bias, s0 = inputs(2, t=8)
    y, state = ops.causal_conv1d(x, weight, bias, initial_state=s0, output_final_state=True)
    y1, mid = ops.causal_conv1d(x[:, :split], weight, bias, initial_state=s0, output_final_state=True)
    y2, end = ops.causal_conv1d(x[:, split:], weight, bias, initial_state=mid, output_final_state=True)
    assert_close(jnp.concatenate([y1, y2], axis=1), y, F32_OUT, "y")
    assert_close(end, state, F32_OUT, "state")


def test_token_by_token_decode():
    x, weight, bias, s0 = inputs(3, t=7)
    y, state = ops.causal_conv1d(x, weight, bias, initial_state=s0, output_final_state=True)
    step = jax.jit(lambda x_t, s: ops.causal_conv1d(x_t, weight, bias, initial_state=s, output_final_state=True))
    s, ys = s0, []
    for t in range(7):
        y_t, s = step(x[:, t : t + 1], s)
        ys.append(y_t)
    assert_close(jnp.concatenate(ys, axis=1), y, F32_OUT, "y")
    assert_close(s, state, F32_OUT, "state")


def lengths_to_ids(rows):
    return jnp.asarray([np.repeat(np.arange(len(r)), r) for r in rows], jnp.int32)


# Second row's last document (length 1) is shorter than W-1: its state is zero-padded.
@pytest.mark.parametrize("lengths", [[[3, 5, 2], [6, 1, 2, 1]], [[10], [2, 8]]])
def test_segments_equal_separate_runs(lengths):
    x, weight, bias, s0 = inputs(4, t=10)
    seg = lengths_to_ids(lengths)
    y, state = ops.causal_conv1d(x, weight, bias, initial_state=s0, output_final_state=True, segment_ids=seg)
    for row, docs in enumerate(lengths):
        start = 0
        for n, doc in enumerate(docs):
            part = x[row : row + 1, start : start + doc]
            init = s0[row : row + 1] if n == 0 else None  # initial_state belongs to the first document
            y_ref, state_ref = reference(part, weight, bias, "silu", init)
            assert_close(y[row : row + 1, start : start + doc], y_ref, F32_OUT, f"row {row} doc {n}")
            start += doc
        assert_close(state[row : row + 1], state_ref, F32_OUT, f"row {row} state")


def test_segment_ids_that_repeat_are_new_documents():
    # Like the recurrences, a document starts wherever the id changes, even back to an old id.
    x, weight, bias, _ = inputs(5, b=1, t=6)
    seg = jnp.asarray([[0, 0, 1, 1, 0, 0]], jnp.int32)
    y, state = ops.causal_conv1d(x, weight, bias, segment_ids=seg, output_final_state=True)
    y_ref = np.concatenate([reference(x[:, i : i + 2], weight, bias)[0] for i in (0, 2, 4)], axis=1)
    assert_close(y, y_ref, F32_OUT, "y")
    assert_close(state, reference(x[:, 4:], weight, bias)[1], F32_OUT, "state")


def test_segmented_chaining_within_a_document():
    # Split mid-document: the carried state continues the last document of the first half.
    x, weight, bias, s0 = inputs(6, t=10)
    seg = lengths_to_ids([[4, 6], [2, 3, 5]])
    y, state = ops.causal_conv1d(x, weight, bias, initial_state=s0, output_final_state=True, segment_ids=seg)
    y1, mid = ops.causal_conv1d(x[:, :7], weight, bias, initial_state=s0, output_final_state=True, segment_ids=seg[:, :7])
    y2, end = ops.causal_conv1d(x[:, 7:], weight, bias, initial_state=mid, output_final_state=True, segment_ids=seg[:, 7:])
    assert_close(jnp.concatenate([y1, y2], axis=1), y, F32_OUT, "y")
    assert_close(end, state, F32_OUT, "state")


def test_gradients_match_lax_conv():
    x, weight, bias, s0 = inputs(7, t=7)
    ct = normal(11, x.shape)

    def loss(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2, 3)))

    op = lambda x, w, b, s: ops.causal_conv1d(x, w, b, initial_state=s)[0]
    assert_close(loss(op)(x, weight, bias, s0), loss(lax_formula)(x, weight, bias, s0), F32_GRAD, "dx, dw, db, ds0")


def test_segmented_gradients_equal_separate_runs():
    x, weight, bias, s0 = inputs(8, b=1, t=9)
    seg = lengths_to_ids([[4, 5]])
    ct = normal(12, x.shape)

    def packed(x, w, b, s):
        return jnp.sum(ops.causal_conv1d(x, w, b, initial_state=s, segment_ids=seg)[0] * ct)

    def separate(x, w, b, s):
        first = lax_formula(x[:, :4], w, b, s)
        second = lax_formula(x[:, 4:], w, b, jnp.zeros_like(s))
        return jnp.sum(jnp.concatenate([first, second], axis=1) * ct)

    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x, weight, bias, s0)
    assert_close(grad(packed), grad(separate), F32_GRAD, "dx, dw, db, ds0")


def test_bf16_input():
    x, weight, bias, s0 = inputs(9)
    xb = x.astype(jnp.bfloat16)
    y, state = ops.causal_conv1d(xb, weight, bias, initial_state=s0, output_final_state=True)
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    y_ref, state_ref = reference(np.asarray(xb.astype(jnp.float32)), weight, bias, "silu", s0)
    assert_close(y, y_ref, BF16_OUT, "y")
    assert_close(state, state_ref, F32_OUT, "state")  # inputs copied exactly into float32


B, T, D, W = 2, 5, 3, 4
ERRORS = {
    "x_rank": (dict(x=jnp.zeros((T, D))), "x must have shape"),
    "x_int": (dict(x=jnp.zeros((B, T, D), jnp.int32)), "floating"),
    "x_empty": (dict(x=jnp.zeros((B, 0, D))), "non-empty"),
    "weight_channels": (dict(weight=jnp.zeros((D + 1, W))), r"weight must have shape \[D=3, W\]"),
    "weight_width_zero": (dict(weight=jnp.zeros((D, 0))), "W >= 1"),
    "weight_rank": (dict(weight=jnp.zeros((D,))), "weight must have shape"),
    "bias_shape": (dict(bias=jnp.zeros((D + 1,))), "bias must have shape"),
    "activation": (dict(activation="relu"), "activation must be one of"),
    "state_shape": (dict(initial_state=jnp.zeros((B, W, D))), "initial_state must have shape"),
    "state_int": (dict(initial_state=jnp.zeros((B, W - 1, D), jnp.int32)), "initial_state"),
    "final_state_flag": (dict(output_final_state="yes"), "output_final_state"),
    "segments_shape": (dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), "segment_ids must have shape"),
    "segments_float": (dict(segment_ids=jnp.zeros((B, T))), "integer"),
}


@pytest.mark.parametrize("kwargs,match", ERRORS.values(), ids=ERRORS.keys())
def test_bad_arguments_raise(kwargs, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", jnp.zeros((B, T, D)))
    weight = kwargs.pop("weight", jnp.zeros((D, W)))
    with pytest.raises(ValueError, match=match):
        ops.causal_conv1d(x, weight, **kwargs)
