"""linear_attn, simple_gla and gla: the recurrent form against the float64 loop of op_cases, with
and without jit, and what is particular to diagonal gates. Every other form is checked against
the recurrent one in test_dispatch.py (op_cases.every_form)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxlm import ops
from numerics import F32_OUT, assert_close
from op_cases import BF16, F32, GROUPED, SEGMENTS, check_form, check_recurrent_form, make_inputs, run, time_slice

OPS = ("linear_attn", "simple_gla", "simple_gla_gamma", "gla")


class RecurrentFormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((op, op) for op in OPS))
    def test_matches_the_float64_loop(self, op):
        check_recurrent_form(op, make_inputs(GROUPED), SEGMENTS, self.variant)


@pytest.mark.parametrize("op", OPS)
def test_segments_equal_separate_runs(op):
    x = make_inputs(GROUPED, seed=3)
    o, _ = run(op, x, "chunk", 8, SEGMENTS)
    for row, ids in enumerate(SEGMENTS):
        bounds = np.flatnonzero(np.diff(ids)) + 1
        for start, stop in zip([0, *bounds], [*bounds, len(ids)]):
            doc = time_slice({n: a[row : row + 1] if n != "gamma" else a for n, a in x.items()}, slice(start, stop))
            o_doc, _ = run(op, doc, "recurrent", initial_state=start == 0)
            assert_close(o[row : row + 1, start:stop], o_doc, F32_OUT, f"row {row} [{start}, {stop})")


@pytest.mark.parametrize("op", OPS)
def test_state_chaining(op):
    x = make_inputs(GROUPED, seed=4)
    o, s = run(op, x, "chunk", 8)
    o1, s1 = run(op, time_slice(x, slice(None, 13)), "chunk", 8)
    o2, s2 = run(op, {**time_slice(x, slice(13, None)), "s0": s1}, "chunk", 8)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, F32_OUT, "o")
    assert_close(s2, s, F32_OUT, "S")


@pytest.mark.parametrize("impl", ["recurrent", "associative", "chunk"])
def test_linear_attn_normalize_matches_formula(impl):
    x = make_inputs(GROUPED, seed=5)
    b, t, h, dk = x["q"].shape
    hv = x["v"].shape[2]
    q, k = jax.nn.elu(x["q"]) + 1, jax.nn.elu(x["k"]) + 1  # positive feature map
    o, _ = ops.linear_attn(q, k, x["v"], normalize=True, segment_ids=SEGMENTS, impl=impl, chunk_size=8)
    qn = np.repeat(np.asarray(q, np.float64), hv // h, axis=2) * dk**-0.5
    kn = np.repeat(np.asarray(k, np.float64), hv // h, axis=2)
    vn = np.asarray(x["v"], np.float64)
    expected = np.zeros(vn.shape)
    for bi in range(b):
        for ti in range(t):
            same = (SEGMENTS[bi, : ti + 1] == SEGMENTS[bi, ti])[:, None]
            scores = np.einsum("hk,shk->sh", qn[bi, ti], kn[bi, : ti + 1]) * same
            expected[bi, ti] = np.einsum("sh,shv->hv", scores, vn[bi, : ti + 1]) / scores.sum(0)[:, None]
    assert_close(o, expected, F32_OUT, "normalised o")


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
@pytest.mark.parametrize("extreme", [0.0, -1e4, -np.inf])
def test_extreme_gates_stay_finite_and_correct(op, extreme):
    """Gates of exactly 0 (no decay) and near or at -inf (a hard reset) at scattered positions.
    A gate at -inf has gradient exp(g)·(...) = 0 exactly; the chunk form treats gates below the
    reset threshold as exact resets, whose gradient is 0 too."""
    x = make_inputs(GROUPED, seed=6)
    rng = np.random.default_rng(0)
    for name in ("g", "gk"):
        x[name] = np.where(rng.random(x[name].shape) < 0.15, np.float32(extreme), x[name])
    check_form(op, "chunk", x, SEGMENTS, 8, F32)


def test_simple_gla_65k_tokens_chunk_matches_recurrent():
    x = make_inputs((1, 65536, 1, 1, 8, 8), seed=7)
    run_65k = jax.jit(lambda x, impl: run("simple_gla", x, impl), static_argnums=1)
    o, s = run_65k(x, "chunk")
    o_ref, s_ref = run_65k(x, "recurrent")
    assert_close(o, o_ref, F32_OUT, "o")
    assert_close(s, s_ref, F32_OUT, "S")


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
def test_bf16_inputs_against_float32_reference(op):
    check_form(op, "chunk", make_inputs(GROUPED, seed=8, dtype=jnp.bfloat16), SEGMENTS, 64, BF16)
