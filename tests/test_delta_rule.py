"""delta_rule and gated_delta_rule: the recurrent form against the float64 loop of op_cases, with
and without jit, and what is particular to the delta rules. Every other form is checked against
the recurrent one in test_dispatch.py (op_cases.every_form)."""

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
    run,
    time_slice,
)


class RecurrentFormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("grouped", "gated_delta_rule", GROUPED, None),
        ("segments", "gated_delta_rule", GROUPED, SEGMENTS),
        ("square", "gated_delta_rule", SQUARE, None),
        ("delta_segments", "delta_rule", GROUPED, SEGMENTS),
    )
    def test_matches_the_float64_loop(self, op, shape, segment_ids):
        check_recurrent_form(op, make_inputs(shape), segment_ids, self.variant)


@pytest.mark.parametrize(
    "impl,chunk_size", [("recurrent", 64), ("associative", 64), ("chunk", 8), ("chunk", 16), ("chunk", 64)]
)
def test_zero_gates_equal_delta_rule(impl, chunk_size):
    x = make_inputs(GROUPED, seed=1)
    x["g"] = np.zeros_like(x["g"])
    gated = forward_fn("gated_delta_rule", impl, chunk_size)(x, SEGMENTS)
    assert_close(gated, forward_fn("delta_rule", impl, chunk_size)(x, SEGMENTS), F32_OUT, "gated with g = 0")
    assert_close(gated, reference("delta_rule", x, SEGMENTS), F32_OUT, "delta_rule loop")


@pytest.mark.parametrize("impl,chunk_size", [("recurrent", 64), ("associative", 64), ("chunk", 8)])
def test_segments_equal_separate_documents(impl, chunk_size):
    x = make_inputs(GROUPED, seed=3)
    o, s = forward_fn("gated_delta_rule", impl, chunk_size)(x, SEGMENTS)
    # Every document in its own batch row, padded at the end to T: trailing tokens with k = 0,
    # β = 0 and g = 0 leave the state untouched, so one call runs them all on their own.
    t = SEGMENTS.shape[1]
    docs, rows, spans = {n: [] for n in x if n != "gamma"}, [], []
    for row, ids in enumerate(SEGMENTS):
        bounds = [0, *(np.flatnonzero(ids[1:] != ids[:-1]) + 1), t]
        for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            for name in docs:
                a = x[name]
                if name == "s0":
                    docs[name].append(a[row] if n == 0 else np.zeros_like(a[row]))
                else:
                    docs[name].append(np.pad(a[row, lo:hi], [(0, t - (hi - lo))] + [(0, 0)] * (a.ndim - 2)))
            rows.append(row)
            spans.append((lo, hi))
    o_docs, s_docs = forward_fn("gated_delta_rule", impl, chunk_size)({n: np.stack(a) for n, a in docs.items()}, None)
    for i, (row, (lo, hi)) in enumerate(zip(rows, spans)):
        assert_close(o[row, lo:hi], o_docs[i, : hi - lo], F32_OUT, f"row {row} tokens {lo}:{hi}")
        if hi == t:
            assert_close(s[row], s_docs[i], F32_OUT, f"row {row} final state")


@pytest.mark.parametrize("split,chunk_size", [(13, 8), (16, 16), (20, 64)])
def test_chunk_state_chaining(split, chunk_size):
    x = make_inputs(GROUPED, seed=4)
    chunk = forward_fn("gated_delta_rule", "chunk", chunk_size)
    o1, s1 = chunk(time_slice(x, slice(None, split)), None)
    o2, s2 = chunk({**time_slice(x, slice(split, None)), "s0": s1}, None)
    o, s = chunk(x, None)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, F32_OUT, "o")
    assert_close(s2, s, F32_OUT, "final state")


@pytest.mark.parametrize("impl,chunk_size", [("associative", 64), ("chunk", 8), ("chunk", 16), ("chunk", 64)])
def test_hard_resets_and_zero_gates(impl, chunk_size):
    x = make_inputs(GROUPED, seed=5)
    g = x["g"]
    g[:, 3:7] = 0.0  # no decay
    g[0, 5, 1] = -1e4
    g[1, 9, :] = -np.inf  # a full reset, mid-chunk
    g[0, 24, 3] = -np.inf  # a full reset on a chunk boundary (8)
    g[1, 32, 2] = -1e4  # on a chunk boundary (8, 16)
    (o, s), _ = evaluate_fn("gated_delta_rule", impl, chunk_size)(x, SEGMENTS)
    assert_close((o, s), reference("gated_delta_rule", x, SEGMENTS), F32_OUT, "forward")
    check_form("gated_delta_rule", impl, x, SEGMENTS, chunk_size, F32)


@pytest.mark.parametrize("impl,chunk_size", [("recurrent", 64), ("associative", 64), ("chunk", 16)])
def test_bf16_inputs(impl, chunk_size):
    check_form("gated_delta_rule", impl, make_inputs(GROUPED, seed=6, dtype=jnp.bfloat16), None, chunk_size, BF16)


def test_default_impl_is_chunk_and_final_state_optional():
    x = make_inputs(GROUPED, seed=7)
    o, s = jax.jit(lambda x: ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"]))(x)
    assert s is None
    assert_close(o, run("gated_delta_rule", x, "recurrent", initial_state=False)[0], F32_OUT, "o")


def _bad_calls():
    """name -> (text the message must contain, the failing call)."""
    x = make_inputs((1, 5, 2, 4, 3, 3))
    q, k, v, g, beta = (x[n] for n in ("q", "k", "v", "g", "beta"))
    gdr, dr = ops.gated_delta_rule, ops.delta_rule
    return {
        "hv_not_multiple": (
            "multiple of q/k's head count",
            lambda: gdr(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3]),  # HV=3, H=2
        ),
        "beta_heads": ("beta must have shape", lambda: gdr(q, k, v, g, beta[:, :, :2])),
        "beta_rank": ("beta must have shape", lambda: dr(q, k, v, beta[..., None])),
        "g_shape": ("g must have shape", lambda: gdr(q, k, v, g[..., None], beta)),
        "g_positive": ("g must be a natural-log decay <= 0", lambda: gdr(q, k, v, -g, beta)),
        "impl_unknown": ("impl must be None, one of", lambda: gdr(q, k, v, g, beta, impl="fast")),
        "chunk_size": ("chunk_size must be a positive power of two", lambda: gdr(q, k, v, g, beta, chunk_size=12)),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_arguments_raise(name):
    message, call = _bad_calls()[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
