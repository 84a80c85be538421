"""impl="pallas" for every linear recurrence against the float32 recurrent reference, in Pallas
interpret mode: outputs, final states and the gradient of every input (gates, beta and the
initial state included), with packed documents, grouped value heads, odd T, K and V that are not
powers of two, extreme gates, bf16 inputs, both kernel drivers and split value blocks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas.delta
import kernels_pallas.gla
import kernels_pallas.simple_gla
from jaxlm import ops
from numerics import BF16_GATE_GRAD, BF16_GRAD, BF16_OUT, F32_GRAD, F32_OUT, assert_close

# (B, T, H, HV, K, V): odd T, grouped value heads, K and V padded inside to 16.
GROUPED = (2, 37, 2, 4, 6, 5)
# HV == H, V = 20 padded to 32, so two 16-column value blocks can be forced.
WIDE = (1, 40, 2, 2, 8, 20)
# Documents: starts mid-chunk and on the 16-token chunk boundary.
SEGMENTS = np.array([[0] * 9 + [1] * 7 + [2] * 21, [3] * 16 + [4] * 21], np.int32)

OPS = {
    "linear_attn": lambda x, **kw: ops.linear_attn(x["q"], x["k"], x["v"], **kw),
    "simple_gla": lambda x, **kw: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], **kw),
    "simple_gla_gamma": lambda x, **kw: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], g_gamma=x["gamma"], **kw),
    "gla": lambda x, **kw: ops.gla(x["q"], x["k"], x["v"], x["gk"], **kw),
    "delta_rule": lambda x, **kw: ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw),
    "gated_delta_rule": lambda x, **kw: ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw),
}
DIFF = {
    "linear_attn": ("q", "k", "v", "s0"),
    "simple_gla": ("q", "k", "v", "g", "s0"),
    "simple_gla_gamma": ("q", "k", "v", "g", "s0"),
    "gla": ("q", "k", "v", "gk", "s0"),
    "delta_rule": ("q", "k", "v", "beta", "s0"),
    "gated_delta_rule": ("q", "k", "v", "g", "beta", "s0"),
}
GATE_GRADS = ("g", "gk", "beta")
KERNELS = {"simple_gla": kernels_pallas.simple_gla, "gla": kernels_pallas.gla, "gated_delta_rule": kernels_pallas.delta}


def make_inputs(shape, seed=0, dtype=jnp.float32):
    """Layer-like inputs: unit-norm keys (the delta rule needs them), log-sigmoid gates."""
    b, t, h, hv, dk, dv = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    k = jax.random.normal(ks[1], (b, t, h, dk))
    x = dict(
        q=jax.random.normal(ks[0], (b, t, h, dk)),
        k=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        v=jax.random.normal(ks[2], (b, t, hv, dv)),
        g=jax.nn.log_sigmoid(2.0 + 2.0 * jax.random.normal(ks[3], (b, t, hv))),
        gk=jax.nn.log_sigmoid(2.0 + 2.0 * jax.random.normal(ks[4], (b, t, hv, dk))),
        beta=jax.nn.sigmoid(jax.random.normal(ks[5], (b, t, hv))),
    )
    x = {n: a.astype(dtype) for n, a in x.items()}
    x["gamma"] = -jnp.linspace(0.01, 0.5, hv)
    x["s0"] = jax.random.normal(ks[6], (b, hv, dk, dv))
    return x


def _loss(diff, rest, segment_ids, op, impl, chunk_size):
    x = {**rest, **diff}
    o, s = OPS[op](
        x, impl=impl, chunk_size=chunk_size, initial_state=x["s0"], output_final_state=True, segment_ids=segment_ids
    )
    wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
    return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws), (o, s)


def _split(x, op):
    diff = {n: x[n] for n in DIFF[op]}
    return diff, {n: a for n, a in x.items() if n not in diff}


@functools.cache
def evaluate_fn(op, impl, chunk_size):
    """jit of ((o, S), gradients) of a fixed random projection of (o, S)."""

    def run(x, segment_ids):
        diff, rest = _split(x, op)
        (_, out), grads = jax.value_and_grad(_loss, has_aux=True)(diff, rest, segment_ids, op, impl, chunk_size)
        return out, grads

    return jax.jit(run)


def check_against_recurrent(x, op, chunk_size, segment_ids, out_tol=F32_OUT, grad_tol=F32_GRAD, gate_tol=F32_GRAD):
    x_ref = {n: a.astype(jnp.float32) for n, a in x.items()}
    (o_ref, s_ref), d_ref = evaluate_fn(op, "recurrent", 64)(x_ref, segment_ids)
    (o, s), d = evaluate_fn(op, "pallas", chunk_size)(x, segment_ids)
    assert o.dtype == x["v"].dtype and s.dtype == jnp.float32
    assert_close(o, o_ref, out_tol, "o")
    assert_close(s, s_ref, out_tol, "final state")
    for name, grad in d.items():
        assert_close(grad, d_ref[name], gate_tol if name in GATE_GRADS else grad_tol, f"d{name}")


@pytest.mark.parametrize(
    "op,chunk_size", [(op, 16) for op in OPS] + [("simple_gla", 64), ("gla", 64), ("gated_delta_rule", 64)]
)
def test_matches_recurrent(op, chunk_size):
    """Three 16-token chunks, or one 64-token chunk of four GLA sub-blocks and a blocked inverse
    over four diagonal blocks (linear_attn and delta_rule share their kernels)."""
    check_against_recurrent(make_inputs(GROUPED, seed=1), op, chunk_size, SEGMENTS)


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
@pytest.mark.parametrize("extreme", [0.0, -1e4, -np.inf])
def test_extreme_gates(op, extreme):
    """Gates of exactly 0 (no decay) and near or at -inf (a hard reset) at scattered positions,
    some on chunk boundaries; the gradient of a gate at -inf is exactly 0 in both forms."""
    x = make_inputs(GROUPED, seed=2)
    rng = np.random.default_rng(0)
    for name in ("g", "gk"):
        mask = rng.random(x[name].shape) < 0.15
        mask[:, 16] = True
        x[name] = jnp.where(mask, extreme, x[name])
    check_against_recurrent(x, op, 16, SEGMENTS)


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
def test_head_dim_256(op):
    """The largest head dims the kernels are meant for: a 256 x 256 state per head."""
    check_against_recurrent(make_inputs((1, 20, 1, 1, 256, 256), seed=7), op, 16, None)


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
def test_bf16_inputs(op):
    """bf16 inputs against the float32 reference on the same rounded values."""
    x = make_inputs(GROUPED, seed=3, dtype=jnp.bfloat16)
    check_against_recurrent(x, op, 16, SEGMENTS, BF16_OUT, BF16_GRAD, BF16_GATE_GRAD)


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
def test_grid_driver_and_value_blocks(op, monkeypatch):
    """The TPU driver (chunks on a sequential grid axis, state in scratch) with the value columns
    split into two blocks, whose key-side cotangents are partial sums."""
    module = KERNELS[op]
    name = module.__all__[0]
    monkeypatch.setattr(module, name, functools.partial(getattr(module, name), driver="grid", block_v=16))
    evaluate_fn.cache_clear()
    try:
        check_against_recurrent(make_inputs(WIDE, seed=4), op, 16, None)
    finally:
        evaluate_fn.cache_clear()


def _pallas_call_names(jaxpr) -> list[str]:
    """Names of every pallas_call in a jaxpr, looking inside every sub-jaxpr."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            names.append(str(eqn.params["name"]))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    names += _pallas_call_names(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    names += _pallas_call_names(sub)
    return names


@pytest.mark.parametrize(
    "op,kernel", [("linear_attn", "simple_gla"), ("simple_gla", "simple_gla"), ("gla", "gla"), ("delta_rule", "delta")]
)
def test_kernels_run_forward_and_backward(op, kernel):
    x = make_inputs(GROUPED)
    diff, rest = _split(x, op)

    def grad_jaxpr(impl):
        loss = functools.partial(_loss, rest=rest, segment_ids=SEGMENTS, op=op, impl=impl, chunk_size=16)
        return jax.make_jaxpr(jax.value_and_grad(lambda d: loss(d)[0]))(diff).jaxpr

    names = _pallas_call_names(grad_jaxpr("pallas"))
    assert len(names) >= 2
    assert f"{kernel}_forward" in names and f"{kernel}_backward" in names, names
    assert _pallas_call_names(grad_jaxpr(None)) == []  # impl=None still picks the XLA chunk form
