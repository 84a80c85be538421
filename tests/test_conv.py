"""causal_conv1d against the float64 loop of op_cases (with and without jit) and, for gradients,
against lax's grouped conv."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxlm import ops
from numerics import BF16_OUT, F32_GRAD, F32_OUT, assert_close
from op_cases import conv_inputs, conv_lax_formula, conv_reference, normal, segments_from_lengths


class ConvTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        (f"w{w}_{'bias' if use_bias else 'no_bias'}_{activation}", w, use_bias, activation)
        for w in (1, 2, 4) for use_bias in (False, True) for activation in (None, "silu", "swish")
    )
    def test_matches_reference(self, w, use_bias, activation):
        x, weight, bias, _ = conv_inputs(0, w=w)
        bias = bias if use_bias else None
        conv = functools.partial(ops.causal_conv1d, activation=activation, output_final_state=True)
        y, state = self.variant(conv)(x, weight, bias)
        y_ref, state_ref = conv_reference(x, weight, bias, activation)
        chex.assert_type([y, state], jnp.float32)
        chex.assert_shape(state, (2, w - 1, 6))
        assert_close(y, y_ref, F32_OUT, "y")
        assert_close(state, state_ref, F32_OUT, "state")
        assert self.variant(functools.partial(ops.causal_conv1d, activation=activation))(x, weight, bias)[1] is None

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("t2", 2), ("t9", 9))  # T=2 < W-1: the final state keeps a slot of initial_state
    def test_initial_state(self, t):
        x, weight, bias, s0 = conv_inputs(1, t=t)
        y, state = self.variant(functools.partial(ops.causal_conv1d, output_final_state=True))(
            x, weight, bias, initial_state=s0
        )
        y_ref, state_ref = conv_reference(x, weight, bias, "silu", s0)
        assert_close(y, y_ref, F32_OUT, "y")
        assert_close(state, state_ref, F32_OUT, "state")


@pytest.mark.parametrize("split", [1, 2, 5])
def test_state_chaining(split):
    x, weight, bias, s0 = conv_inputs(2, t=8)
    y, state = ops.causal_conv1d(x, weight, bias, initial_state=s0, output_final_state=True)
    y1, mid = ops.causal_conv1d(x[:, :split], weight, bias, initial_state=s0, output_final_state=True)
    y2, end = ops.causal_conv1d(x[:, split:], weight, bias, initial_state=mid, output_final_state=True)
    assert_close(jnp.concatenate([y1, y2], axis=1), y, F32_OUT, "y")
    assert_close(end, state, F32_OUT, "state")


def test_token_by_token_decode():
    x, weight, bias, s0 = conv_inputs(3, t=7)
    y, state = ops.causal_conv1d(x, weight, bias, initial_state=s0, output_final_state=True)
    step = jax.jit(lambda x_t, s: ops.causal_conv1d(x_t, weight, bias, initial_state=s, output_final_state=True))
    s, ys = s0, []
    for t in range(7):
        y_t, s = step(x[:, t : t + 1], s)
        ys.append(y_t)
    assert_close(jnp.concatenate(ys, axis=1), y, F32_OUT, "y")
    assert_close(s, state, F32_OUT, "state")


# Second row's last document (length 1) is shorter than W-1: its state is zero-padded.
@pytest.mark.parametrize("lengths", [[[3, 5, 2], [6, 1, 2, 1]], [[10], [2, 8]]])
def test_segments_equal_separate_runs(lengths):
    x, weight, bias, s0 = conv_inputs(4, t=10)
    seg = segments_from_lengths(lengths)
    y, state = ops.causal_conv1d(x, weight, bias, initial_state=s0, output_final_state=True, segment_ids=seg)
    for row, docs in enumerate(lengths):
        start = 0
        for n, doc in enumerate(docs):
            part = x[row : row + 1, start : start + doc]
            init = s0[row : row + 1] if n == 0 else None  # initial_state belongs to the first document
            y_ref, state_ref = conv_reference(part, weight, bias, "silu", init)
            assert_close(y[row : row + 1, start : start + doc], y_ref, F32_OUT, f"row {row} doc {n}")
            start += doc
        assert_close(state[row : row + 1], state_ref, F32_OUT, f"row {row} state")


def test_segment_ids_that_repeat_are_new_documents():
    # Like the recurrences, a document starts wherever the id changes, even back to an old id.
    x, weight, bias, _ = conv_inputs(5, b=1, t=6)
    seg = jnp.asarray([[0, 0, 1, 1, 0, 0]], jnp.int32)
    y, state = ops.causal_conv1d(x, weight, bias, segment_ids=seg, output_final_state=True)
    y_ref = np.concatenate([conv_reference(x[:, i : i + 2], weight, bias)[0] for i in (0, 2, 4)], axis=1)
    assert_close(y, y_ref, F32_OUT, "y")
    assert_close(state, conv_reference(x[:, 4:], weight, bias)[1], F32_OUT, "state")


def test_segmented_chaining_within_a_document():
    # Split mid-document: the carried state continues the last document of the first half.
    x, weight, bias, s0 = conv_inputs(6, t=10)
    seg = segments_from_lengths([[4, 6], [2, 3, 5]])
    y, state = ops.causal_conv1d(x, weight, bias, initial_state=s0, output_final_state=True, segment_ids=seg)
    y1, mid = ops.causal_conv1d(x[:, :7], weight, bias, initial_state=s0, output_final_state=True, segment_ids=seg[:, :7])
    y2, end = ops.causal_conv1d(x[:, 7:], weight, bias, initial_state=mid, output_final_state=True, segment_ids=seg[:, 7:])
    assert_close(jnp.concatenate([y1, y2], axis=1), y, F32_OUT, "y")
    assert_close(end, state, F32_OUT, "state")


def test_gradients_match_lax_conv():
    x, weight, bias, s0 = conv_inputs(7, t=7)
    ct = normal(11, x.shape)

    def loss(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2, 3)))

    op = lambda x, w, b, s: ops.causal_conv1d(x, w, b, initial_state=s)[0]
    assert_close(loss(op)(x, weight, bias, s0), loss(conv_lax_formula)(x, weight, bias, s0), F32_GRAD, "dx, dw, db, ds0")


def test_segmented_gradients_equal_separate_runs():
    x, weight, bias, s0 = conv_inputs(8, b=1, t=9)
    seg = segments_from_lengths([[4, 5]])
    ct = normal(12, x.shape)

    def packed(x, w, b, s):
        return jnp.sum(ops.causal_conv1d(x, w, b, initial_state=s, segment_ids=seg)[0] * ct)

    def separate(x, w, b, s):
        first = conv_lax_formula(x[:, :4], w, b, s)
        second = conv_lax_formula(x[:, 4:], w, b, jnp.zeros_like(s))
        return jnp.sum(jnp.concatenate([first, second], axis=1) * ct)

    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x, weight, bias, s0)
    assert_close(grad(packed), grad(separate), F32_GRAD, "dx, dw, db, ds0")


def test_bf16_input():
    x, weight, bias, s0 = conv_inputs(9)
    xb = x.astype(jnp.bfloat16)
    y, state = ops.causal_conv1d(xb, weight, bias, initial_state=s0, output_final_state=True)
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    y_ref, state_ref = conv_reference(np.asarray(xb.astype(jnp.float32)), weight, bias, "silu", s0)
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
