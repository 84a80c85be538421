"""ops.kda (Kimi Delta Attention): the recurrent form against the float64 loop of op_cases, and
what is particular to a per-channel decay in a delta rule. Every other form is checked against
the recurrent one, gradients included, in test_dispatch.py (op_cases.every_form)."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxlm import ops
from numerics import F32_OUT, assert_close
from op_cases import (
    BF16,
    F32,
    GROUPED,
    SEGMENTS,
    SQUARE,
    check_form,
    check_recurrent_form,
    evaluate_fn,
    forward_fn,
    make_inputs,
    reference,
    time_slice,
)


class RecurrentFormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("grouped", GROUPED, None), ("segments", GROUPED, SEGMENTS), ("square", SQUARE, None))
    def test_matches_the_float64_loop(self, shape, segment_ids):
        check_recurrent_form("kda", make_inputs(shape), segment_ids, self.variant)


@pytest.mark.parametrize("impl,chunk_size", [("recurrent", 64), ("associative", 64), ("chunk", 8), ("chunk", 64)])
def test_equal_channel_gates_are_the_gated_delta_rule(impl, chunk_size):
    """A per-channel gate that is the same on every channel is Gated DeltaNet's gate per head."""
    x = make_inputs(GROUPED, seed=2)
    x["gk"] = np.repeat(x["g"][..., None], x["q"].shape[-1], axis=-1)
    o, s = forward_fn("kda", impl, chunk_size)(x, SEGMENTS)
    assert_close((o, s), forward_fn("gated_delta_rule", impl, chunk_size)(x, SEGMENTS), F32_OUT, "kda = gdr")


@pytest.mark.parametrize("split,chunk_size", [(13, 8), (16, 16), (20, 64)])
def test_chunk_state_chaining(split, chunk_size):
    x = make_inputs(GROUPED, seed=4)
    chunk = forward_fn("kda", "chunk", chunk_size)
    o1, s1 = chunk(time_slice(x, slice(None, split)), None)
    o2, s2 = chunk({**time_slice(x, slice(split, None)), "s0": s1}, None)
    o, s = chunk(x, None)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, F32_OUT, "o")
    assert_close(s2, s, F32_OUT, "final state")


@pytest.mark.parametrize("extreme", [0.0, -1e4, -np.inf])
@pytest.mark.parametrize("impl,chunk_size", [("chunk", 8), ("chunk", 64), ("associative", 64)])
def test_extreme_channel_gates(extreme, impl, chunk_size):
    """Channels at no decay, at −1e4 and at −inf, scattered (a channel below the reset threshold
    is cleared exactly, in every form): values against the float64 loop, gradients against the
    recurrent form's, and every gradient finite."""
    x = make_inputs(GROUPED, seed=6)
    rng = np.random.default_rng(0)
    x["gk"] = np.where(rng.random(x["gk"].shape) < 0.15, np.float32(extreme), x["gk"])
    (o, s), grads = evaluate_fn("kda", impl, chunk_size)(x, SEGMENTS)
    assert_close((o, s), reference("kda", x, SEGMENTS), F32_OUT, "forward")
    for name, grad in grads.items():
        assert np.isfinite(np.asarray(grad)).all(), f"d{name} is not finite"
    check_form("kda", impl, x, SEGMENTS, chunk_size, F32)


def test_65k_tokens_chunk_form_is_finite_and_matches_recurrent():
    """T = 65536 with strong per-channel decays: the chunk form's values and gradients are
    finite and equal the recurrent form's."""
    x = make_inputs((1, 65536, 1, 1, 4, 4), seed=7)
    x["gk"] = x["gk"] * 8.0  # decays down to about exp(-60) per step
    (o, s), grads = evaluate_fn("kda", "chunk", 64)(x, None)
    (o_ref, s_ref), grads_ref = evaluate_fn("kda", "recurrent", 64)(x, None)
    assert_close((o, s), (o_ref, s_ref), F32_OUT, "forward")
    for name, grad in grads.items():
        assert np.isfinite(np.asarray(grad)).all(), f"d{name} is not finite"
        assert_close(grad, grads_ref[name], F32.gate_grad, f"d{name}")


@pytest.mark.parametrize("impl,chunk_size", [("recurrent", 64), ("chunk", 16)])
def test_bf16_inputs(impl, chunk_size):
    check_form("kda", impl, make_inputs(GROUPED, seed=6, dtype=jnp.bfloat16), SEGMENTS, chunk_size, BF16)


def _bad_calls():
    """name -> (text the message must contain, the failing call)."""
    x = make_inputs((1, 5, 2, 4, 3, 3))
    q, k, v, g, beta = (x[n] for n in ("q", "k", "v", "gk", "beta"))
    return {
        "scalar_gate": ("g must have shape", lambda: ops.kda(q, k, v, x["g"], beta)),
        "g_positive": ("g must be a natural-log decay <= 0", lambda: ops.kda(q, k, v, -g, beta)),
        "beta_heads": ("beta must have shape", lambda: ops.kda(q, k, v, g, beta[:, :, :2])),
        "impl_unknown": ("impl must be None, one of", lambda: ops.kda(q, k, v, g, beta, impl="fused")),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_arguments_raise(name):
    message, call = _bad_calls()[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_default_impl_and_final_state_optional():
    x = make_inputs(GROUPED, seed=7)
    o, s = jax.jit(lambda x: ops.kda(x["q"], x["k"], x["v"], x["gk"], x["beta"]))(x)
    assert s is None
    o_ref, _ = forward_fn("kda", "recurrent")({**x, "s0": np.zeros_like(x["s0"])}, None)
    assert_close(o, o_ref, F32_OUT, "o")


def test_chunk_form_default_tile_is_16_on_cpu():
    # chunk_size=None picks the tile KDA's chunk form runs fastest at on XLA:CPU (RESULTS.md).
    assert jax.default_backend() == "cpu"
    x = make_inputs((1, 40, 2, 4, 2, 3), seed=8)
    args = (x["q"], x["k"], x["v"], x["gk"], x["beta"])
    default = jax.jit(lambda *a: ops.kda(*a, impl="chunk", output_final_state=True))(*args)
    at_16 = jax.jit(lambda *a: ops.kda(*a, impl="chunk", chunk_size=16, output_final_state=True))(*args)
    at_64 = jax.jit(lambda *a: ops.kda(*a, impl="chunk", chunk_size=64, output_final_state=True))(*args)
    chex.assert_trees_all_equal(default, at_16)
    assert not all(np.array_equal(a, b) for a, b in zip(default, at_64)), "None should not run 64-token chunks"
