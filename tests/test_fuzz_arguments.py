"""Hypothesis fuzzing of the recurrence ops' arguments: every call either raises a clean
ValueError (for a broken argument) or returns a finite result equal to the recurrent form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxlm import ops
from numerics import F32_OUT, assert_close

OPS = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")
# Broken arguments, each a ValueError whatever the op; some apply to gated ops only.
MUTATIONS = (
    "q_rank", "k_shape", "v_batch", "v_time", "hv_not_multiple", "q_int", "state_shape",
    "segment_shape", "segment_float", "impl", "chunk_zero", "chunk_odd", "chunk_float", "scale_nan",
    "g_shape", "g_positive", "g_nan", "beta_shape", "beta_nan", "gamma_shape", "normalize_str",
)
GATED = {"simple_gla": "g", "gla": "g", "gated_delta_rule": "g"}


def call(op: str, a: dict):
    common = {n: a[n] for n in ("initial_state", "segment_ids", "impl", "chunk_size", "scale", "output_final_state") if n in a}
    if op == "linear_attn":
        return ops.linear_attn(a["q"], a["k"], a["v"], normalize=a.get("normalize", False), **common)
    if op == "simple_gla":
        return ops.simple_gla(a["q"], a["k"], a["v"], a["g"], g_gamma=a.get("g_gamma"), **common)
    if op == "gla":
        return ops.gla(a["q"], a["k"], a["v"], a["g"], **common)
    if op == "delta_rule":
        return ops.delta_rule(a["q"], a["k"], a["v"], a["beta"], **common)
    return ops.gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], **common)


@st.composite
def calls(draw):
    op = draw(st.sampled_from(OPS))
    b, t, h = draw(st.integers(1, 2)), draw(st.integers(1, 11)), draw(st.integers(1, 2))
    hv = h * draw(st.integers(1, 2))
    dk, dv = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    k = rng.normal(size=(b, t, h, dk))
    a = dict(
        q=rng.normal(size=(b, t, h, dk)).astype(np.float32),
        k=(k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32),
        v=rng.normal(size=(b, t, hv, dv)).astype(np.float32),
        initial_state=rng.normal(size=(b, hv, dk, dv)).astype(np.float32),
        segment_ids=np.sort(rng.integers(0, 3, size=(b, t)), axis=1).astype(np.int32),
        impl=draw(st.sampled_from(["associative", "chunk", None])),
        chunk_size=draw(st.sampled_from([1, 2, 4, 64])),
        output_final_state=True,
    )
    if op == "gla":
        a["g"] = -rng.exponential(size=(b, t, hv, dk)).astype(np.float32)
    elif op in GATED:
        a["g"] = -rng.exponential(size=(b, t, hv)).astype(np.float32)
    if op == "simple_gla" and draw(st.booleans()):
        a["g_gamma"] = -rng.exponential(size=(hv,)).astype(np.float32)
    if "delta" in op:
        a["beta"] = rng.uniform(size=(b, t, hv)).astype(np.float32)
    mutation = draw(st.sampled_from((None,) + MUTATIONS))
    return op, a, _mutate(a, mutation, op, hv, h)


def _mutate(a: dict, mutation, op, hv, h) -> bool:
    """Breaks one argument in place; returns whether the call must now raise ValueError."""
    if mutation is None:
        return False
    gated = "g" in a
    if mutation in ("g_shape", "g_positive", "g_nan") and not gated:
        return False
    if mutation in ("beta_shape", "beta_nan") and "beta" not in a:
        return False
    if mutation == "gamma_shape" and op != "simple_gla":
        return False
    if mutation == "normalize_str" and op != "linear_attn":
        return False
    if mutation == "hv_not_multiple" and h == 1:
        return False
    change = {
        "q_rank": lambda: a.update(q=a["q"][..., 0]),
        "k_shape": lambda: a.update(k=np.concatenate([a["k"], a["k"][..., :1]], -1)),
        "v_batch": lambda: a.update(v=np.concatenate([a["v"], a["v"]], 0)),
        "v_time": lambda: a.update(v=np.concatenate([a["v"], a["v"][:, :1]], 1)),
        "hv_not_multiple": lambda: a.update(v=a["v"][:, :, : hv - 1] if hv > h else np.concatenate([a["v"]] * 3, 2)[:, :, : h + 1]),
        "q_int": lambda: a.update(q=a["q"].astype(np.int32)),
        "state_shape": lambda: a.update(initial_state=a["initial_state"][..., :1, :].repeat(2, -2)),
        "segment_shape": lambda: a.update(segment_ids=a["segment_ids"][:, :-1] if a["segment_ids"].shape[1] > 1 else a["segment_ids"][:, :0]),
        "segment_float": lambda: a.update(segment_ids=a["segment_ids"].astype(np.float32)),
        "impl": lambda: a.update(impl="fused"),
        "chunk_zero": lambda: a.update(chunk_size=0),
        "chunk_odd": lambda: a.update(chunk_size=48),
        "chunk_float": lambda: a.update(chunk_size=64.0),
        "scale_nan": lambda: a.update(scale=float("nan")),
        "g_shape": lambda: a.update(g=a["g"][:, :, :1].repeat(a["v"].shape[2] + 1, 2)),
        "g_positive": lambda: a.update(g=np.abs(a["g"]) + 0.5),
        "g_nan": lambda: a.update(g=np.where(np.arange(a["g"].size).reshape(a["g"].shape) == 0, np.nan, a["g"]).astype(np.float32)),
        "beta_shape": lambda: a.update(beta=a["beta"][..., None]),
        "beta_nan": lambda: a.update(beta=np.full_like(a["beta"], np.nan)),
        "gamma_shape": lambda: a.update(g_gamma=-np.ones((hv + 1,), np.float32)),
        "normalize_str": lambda: a.update(normalize="yes"),
    }[mutation]
    change()
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_arguments_raise_value_error_or_give_the_recurrent_result(case):
    op, a, must_raise = case
    if must_raise:
        with pytest.raises(ValueError):
            call(op, a)
        return
    o, s = call(op, a)
    o_ref, s_ref = call(op, {**a, "impl": "recurrent"})
    assert_close((o, s), (o_ref, s_ref), F32_OUT, f"{op} impl={a['impl']} chunk={a['chunk_size']}")


def test_gate_values_are_checked_only_outside_jit():
    """Under jit a gate's values are unknown; its shape is still checked."""
    q = jnp.ones((1, 3, 1, 2))
    jitted = jax.jit(lambda g: ops.simple_gla(q, q, q, g)[0])
    g = -jnp.ones((1, 3, 1))
    assert_close(jitted(g), ops.simple_gla(q, q, q, g, impl="recurrent")[0], F32_OUT, "jitted o")
    with pytest.raises(ValueError, match="g must have shape"):
        jitted(-jnp.ones((1, 3, 2)))
