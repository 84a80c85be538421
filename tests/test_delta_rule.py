"""delta_rule and gated_delta_rule: every form against the float32 recurrent reference, which is
itself checked against a float64 loop written here."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ops
from numerics import BF16_GATE_GRAD, BF16_GRAD, BF16_OUT, F32_GRAD, F32_OUT, assert_close

# (B, T, H, HV, K, V): odd T, K and V not powers of two, grouped value heads; then HV == H.
GROUPED = (2, 37, 2, 4, 6, 5)
SQUARE = (1, 40, 2, 2, 8, 8)
# Packed documents for a [2, 37] batch: one start mid-chunk, one exactly on a chunk boundary.
SEGMENTS = np.array([[0] * 10 + [1] * 6 + [2] * 21, [3] * 20 + [5] * 17], np.int32)
# (impl, chunk_size) of every form checked against the recurrent reference.
FORMS = [("associative", 64), ("chunk", 8), ("chunk", 16), ("chunk", 64)]
GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(shape, seed=0):
    """Inputs as real layers give them: L2-normalised keys, β = sigmoid, g = log_sigmoid."""
    b, t, h, hv, dk, dv = shape
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(b, t, h, dk))
    return dict(
        q=rng.normal(size=(b, t, h, dk)).astype(np.float32),
        k=(k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32),
        v=rng.normal(size=(b, t, hv, dv)).astype(np.float32),
        g=np.asarray(jax.nn.log_sigmoid(rng.normal(2.0, 1.0, size=(b, t, hv))), np.float32),
        beta=np.asarray(jax.nn.sigmoid(rng.normal(size=(b, t, hv))), np.float32),
        initial_state=rng.normal(size=(b, hv, dk, dv)).astype(np.float32),
    )


def naive_reference(q, k, v, g, beta, initial_state, segment_ids=None):
    """Float64 loop over tokens, straight from the definition."""
    q, k, v, g, beta, s = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, initial_state))
    b, t, h, dk = q.shape
    hv = v.shape[2]
    group = hv // h
    o = np.zeros(v.shape)
    s = s.copy()
    for i in range(b):
        for j in range(hv):
            state = s[i, j]
            for step in range(t):
                if segment_ids is not None and step > 0 and segment_ids[i, step] != segment_ids[i, step - 1]:
                    state = np.zeros_like(state)
                kt, qt = k[i, step, j // group], q[i, step, j // group] * dk**-0.5
                state = np.exp(g[i, step, j]) * state
                u = beta[i, step, j] * (v[i, step, j] - state.T @ kt)
                state = state + np.outer(kt, u)
                o[i, step, j] = state.T @ qt
            s[i, j] = state
    return o, s


def _call(x, segment_ids, impl, chunk_size, gated, output_final_state=True):
    common = dict(
        initial_state=x["initial_state"],
        output_final_state=output_final_state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=chunk_size,
    )
    if gated:
        return ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **common)
    return ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], **common)


@functools.cache
def forward_fn(impl, chunk_size, gated):
    """A jitted (o, S), shared by every test with the same static arguments."""
    return jax.jit(functools.partial(_call, impl=impl, chunk_size=chunk_size, gated=gated))


@functools.cache
def evaluate_fn(impl, chunk_size, gated):
    """A jitted ((o, S), gradients of sum(o·w_o) + sum(S·w_s) for every input): one compile
    gives both the forward values and the gradients."""

    def loss(x, segment_ids, w_o, w_s):
        o, s = _call(x, segment_ids, impl, chunk_size, gated)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s), (o, s)

    return jax.jit(jax.grad(loss, has_aux=True))


def evaluate(x, impl, chunk_size, gated=True, segment_ids=None):
    """((o, S), {input name: gradient}); g is left out for delta_rule."""
    rng = np.random.default_rng(1)
    w_o = rng.normal(size=x["v"].shape).astype(np.float32)
    w_s = rng.normal(size=x["initial_state"].shape).astype(np.float32)
    d, out = evaluate_fn(impl, chunk_size, gated)(x, segment_ids, w_o, w_s)
    return out, {n: d[n] for n in GRAD_NAMES if gated or n != "g"}


@pytest.mark.parametrize(
    "shape,segmented", [(GROUPED, False), (GROUPED, True), (SQUARE, False)], ids=["grouped", "segments", "square"]
)
def test_recurrent_matches_float64_loop(shape, segmented):
    x = make_inputs(shape)
    seg = SEGMENTS if segmented else None
    (o, s), _ = evaluate(x, "recurrent", 64, segment_ids=seg)
    o_ref, s_ref = naive_reference(**x, segment_ids=seg)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert_close(o, o_ref, F32_OUT, "o")
    assert_close(s, s_ref, F32_OUT, "final state")


@pytest.mark.parametrize("impl,chunk_size", [("recurrent", 64), *FORMS])
def test_zero_gates_equal_delta_rule(impl, chunk_size):
    x = make_inputs(GROUPED, seed=1)
    x["g"] = np.zeros_like(x["g"])
    (o, s), _ = evaluate(x, impl, chunk_size, gated=False, segment_ids=SEGMENTS)
    o_ref, s_ref = naive_reference(**x, segment_ids=SEGMENTS)
    assert_close(o, o_ref, F32_OUT, "delta_rule o")
    assert_close(s, s_ref, F32_OUT, "delta_rule state")
    assert_close(evaluate(x, impl, chunk_size, segment_ids=SEGMENTS)[0], (o, s), F32_OUT, "gated with g = 0")


@pytest.mark.parametrize("impl,chunk_size", FORMS)
@pytest.mark.parametrize("case", ["grouped-segments", "square", "delta-segments"])
def test_form_matches_recurrent(impl, chunk_size, case):
    shape = SQUARE if case == "square" else GROUPED
    gated = not case.startswith("delta")
    seg = SEGMENTS if case.endswith("segments") else None
    x = make_inputs(shape, seed=2)
    out, d = evaluate(x, impl, chunk_size, gated, seg)
    out_ref, d_ref = evaluate(x, "recurrent", 64, gated, seg)
    assert_close(out, out_ref, F32_OUT, "forward")
    assert_close(d, d_ref, F32_GRAD, "grads")


@pytest.mark.parametrize("impl,chunk_size", [("recurrent", 64), ("associative", 64), ("chunk", 8)])
def test_segments_equal_separate_documents(impl, chunk_size):
    x = make_inputs(GROUPED, seed=3)
    (o, s), _ = evaluate(x, impl, chunk_size, segment_ids=SEGMENTS)
    # Every document in its own batch row, padded at the end to T: trailing tokens with k = 0,
    # β = 0 and g = 0 leave the state untouched, so one call runs them all on their own.
    docs, rows, spans = {n: [] for n in x}, [], []
    for row, ids in enumerate(SEGMENTS):
        bounds = [0, *(np.flatnonzero(ids[1:] != ids[:-1]) + 1), len(ids)]
        for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            for name, a in x.items():
                if name == "initial_state":
                    docs[name].append(a[row] if n == 0 else np.zeros_like(a[row]))
                else:
                    docs[name].append(np.pad(a[row, lo:hi], [(0, len(ids) - (hi - lo))] + [(0, 0)] * (a.ndim - 2)))
            rows.append(row)
            spans.append((lo, hi))
    o_docs, s_docs = forward_fn(impl, chunk_size, True)({n: np.stack(a) for n, a in docs.items()}, None)
    for i, (row, (lo, hi)) in enumerate(zip(rows, spans)):
        assert_close(o[row, lo:hi], o_docs[i, : hi - lo], F32_OUT, f"row {row} tokens {lo}:{hi}")
        if hi == SEGMENTS.shape[1]:
            assert_close(s[row], s_docs[i], F32_OUT, f"row {row} final state")


@pytest.mark.parametrize("split,chunk_size", [(13, 8), (16, 16), (20, 64)])
def test_chunk_state_chaining(split, chunk_size):
    x = make_inputs(GROUPED, seed=4)
    run = forward_fn("chunk", chunk_size, True)
    first = {n: (a if n == "initial_state" else a[:, :split]) for n, a in x.items()}
    o1, s1 = run(first, None)
    second = {n: (s1 if n == "initial_state" else a[:, split:]) for n, a in x.items()}
    o2, s2 = run(second, None)
    o, s = run(x, None)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, F32_OUT, "o")
    assert_close(s2, s, F32_OUT, "final state")


@pytest.mark.parametrize("impl,chunk_size", FORMS)
def test_hard_resets_and_zero_gates(impl, chunk_size):
    x = make_inputs(GROUPED, seed=5)
    g = x["g"].copy()
    g[:, 3:7] = 0.0  # no decay
    g[0, 5, 1] = -1e4
    g[1, 9, :] = -np.inf  # a full reset, mid-chunk
    g[0, 24, 3] = -np.inf  # a full reset on a chunk boundary (8)
    g[1, 32, 2] = -1e4  # on a chunk boundary (8, 16)
    x["g"] = g
    out, d = evaluate(x, impl, chunk_size, segment_ids=SEGMENTS)
    assert_close(out, naive_reference(**x, segment_ids=SEGMENTS), F32_OUT, "forward")
    out_ref, d_ref = evaluate(x, "recurrent", 64, segment_ids=SEGMENTS)
    assert_close(out, out_ref, F32_OUT, "forward")
    assert_close(d, d_ref, F32_GRAD, "grads")


@pytest.mark.parametrize("impl,chunk_size", [("recurrent", 64), ("associative", 64), ("chunk", 16)])
def test_bf16_inputs(impl, chunk_size):
    x = make_inputs(GROUPED, seed=6)
    x16 = {n: (a if n == "initial_state" else jnp.asarray(a, jnp.bfloat16)) for n, a in x.items()}
    # The reference sees exactly the bf16-rounded values, in float32, so the comparison measures
    # the op's own error (float32 compute, bf16 output), not the rounding of its inputs.
    x32 = {n: jnp.asarray(a, jnp.float32) for n, a in x16.items()}
    (o, s), d = evaluate(x16, impl, chunk_size)
    (o_ref, s_ref), d_ref = evaluate(x32, "recurrent", 64)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(o, o_ref, BF16_OUT, "o")
    assert_close(s, s_ref, BF16_OUT, "final state")
    for name in GRAD_NAMES:
        tol = BF16_GATE_GRAD if name in ("g", "beta") else BF16_GRAD
        assert_close(d[name], d_ref[name], tol, f"d{name}")


def test_default_impl_is_chunk_and_final_state_optional():
    x = make_inputs(GROUPED, seed=7)
    default = jax.jit(lambda x: _call(x, None, None, 64, True, output_final_state=False))
    o, s = default(x)
    assert s is None
    assert_close(o, forward_fn("recurrent", 64, True)(x, None)[0], F32_OUT, "o")


def _bad_calls():
    """name -> (text the message must contain, the failing call)."""
    x = make_inputs((1, 5, 2, 4, 3, 3))
    q, k, v, g, beta = x["q"], x["k"], x["v"], x["g"], x["beta"]
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
        "impl_unknown": ("impl must be None or one of", lambda: gdr(q, k, v, g, beta, impl="fast")),
        "chunk_size": ("chunk_size must be a positive power of two", lambda: gdr(q, k, v, g, beta, chunk_size=12)),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_arguments_raise(name):
    message, call = _bad_calls()[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
