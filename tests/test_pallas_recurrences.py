"""impl="pallas" for every linear recurrence against the float32 recurrent reference, in the HLO
interpreter: outputs, final states and the gradient of every input (gates, beta and the initial
state included), with packed documents, grouped value heads, odd T, K and V that are not powers
of two, extreme gates, bf16 inputs, both kernel drivers and split value blocks. Also: kernel
settings reach jitted callers, and the kernels lower for GPU (Triton) and TPU (Mosaic) from CPU.
The TPU kernels run in TPU interpret mode in test_pallas_tpu_interpret.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import kernels_pallas.delta
import kernels_pallas.gla
import kernels_pallas.simple_gla
from jaxlm import ops
from kernels_pallas import KernelSettings, current_settings, kernel_settings
from kernels_pallas.call_layout import pallas_call_eqns, pallas_call_names
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
def test_grid_driver_and_value_blocks(op):
    """The TPU driver (chunks on a sequential grid axis, state in scratch) in the HLO interpreter,
    with the value columns split into two blocks, whose key-side cotangents are partial sums."""
    with kernel_settings(driver="grid", block_v=16):
        check_against_recurrent(make_inputs(WIDE, seed=4), op, 16, None)


@pytest.mark.parametrize(
    "op,kernel", [("linear_attn", "simple_gla"), ("simple_gla", "simple_gla"), ("gla", "gla"), ("delta_rule", "delta")]
)
def test_kernels_run_forward_and_backward(op, kernel):
    x = make_inputs(GROUPED)
    diff, rest = _split(x, op)

    def grad_jaxpr(impl):
        loss = functools.partial(_loss, rest=rest, segment_ids=SEGMENTS, op=op, impl=impl, chunk_size=16)
        return jax.make_jaxpr(jax.value_and_grad(lambda d: loss(d)[0]))(diff).jaxpr

    names = pallas_call_names(grad_jaxpr("pallas"))
    assert len(names) >= 2
    assert f"{kernel}_forward" in names and f"{kernel}_backward" in names, names
    assert pallas_call_names(grad_jaxpr(None)) == []  # impl=None still picks the XLA chunk form


def test_settings_reach_a_jitted_caller():
    """Kernel settings are part of jit's cache key: a jitted caller traces again under new
    settings (here the grid driver), and reuses its first trace once they are restored."""
    x = make_inputs(WIDE, seed=5)
    op = functools.partial(OPS["simple_gla"], impl="pallas", chunk_size=16, output_final_state=True)
    traced = []

    def run(x):
        traced.append(current_settings())
        return op(x)

    jitted = jax.jit(run)
    o_loop, s_loop = jitted(x)
    with kernel_settings(driver="grid", block_v=16) as grid_settings:
        o_grid, s_grid = jitted(x)
        grids = [eqn.params["grid_mapping"].grid for eqn in pallas_call_eqns(jax.make_jaxpr(op)(x).jaxpr)]
    jitted(x)
    assert traced == [KernelSettings(), grid_settings]
    assert grids == [(2, 2, 3)]  # (B*HV, V/16 value blocks, chunks)
    assert_close(o_grid, o_loop, F32_OUT, "o")
    assert_close(s_grid, s_loop, F32_OUT, "final state")


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="unknown kernel settings"):
        with kernel_settings(block_w=16):
            pass
    with pytest.raises(ValueError, match="driver"):
        KernelSettings(driver="scan")
    with pytest.raises(ValueError, match="block_v"):
        KernelSettings(block_v=24)
    x = jnp.zeros((1, 16, 16))
    s0 = jnp.zeros((1, 16, 256))
    v = jnp.zeros((1, 16, 256))
    kernel = kernels_pallas.simple_gla.simple_gla
    with pytest.raises(ValueError, match="block_v on TPU"):  # a [C, 64] block breaks Mosaic's (8, 128) tiling
        kernel(x, x, v, x[..., :1], x[..., :1], s0, chunk=16, backend="tpu", interpret=False, block_v=64)
    with pytest.raises(ValueError, match="needs backend 'tpu'"):
        kernel(x, x, v, x[..., :1], x[..., :1], s0, chunk=16, backend="gpu", interpret=pltpu.InterpretParams())


# kernel, gate width (1: scalar, None: per key channel), whether it takes beta
KERNEL_CALLS = {
    "simple_gla": (kernels_pallas.simple_gla.simple_gla, 1, False),
    "gla": (kernels_pallas.gla.gla, None, False),
    "delta": (kernels_pallas.delta.gated_delta_rule, 1, True),
}


def _lowered(platform: str, backend: str) -> dict[str, str]:
    """Each kernel's value and gradients, lowered with jax.export from this CPU for another
    platform, with 128-column value blocks of V=256: kernel name -> StableHLO text."""
    from jax import export

    bh, t, dk, dv = 2, 256, 128, 256
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    custom_call = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}[platform]
    modules = {}
    for name, (kernel, gate_width, with_beta) in KERNEL_CALLS.items():
        gate = f32((bh, t, gate_width or dk))
        args = [f32((bh, t, dk)), f32((bh, t, dk)), f32((bh, t, dv)), gate, gate]
        args += [f32((bh, t, 1))] * with_beta + [f32((bh, dk, dv))]

        def loss(*a, kernel=kernel):
            o, s = kernel(*a, chunk=64)
            return jnp.sum(o) + jnp.sum(s)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        with kernel_settings(backend=backend, interpret=False, block_v=128):
            unchecked = [export.DisabledSafetyCheck.custom_call(custom_call)]
            modules[name] = export.export(fn, platforms=[platform], disabled_checks=unchecked)(*args).mlir_module()
    return modules


def _check_lowered(modules: dict[str, str], custom_call: str) -> None:
    for name, text in modules.items():
        assert text.count(f"custom_call @{custom_call}") == 3, name  # forward, states, backward
        for kernel in ("forward", "states_forward", "backward"):
            assert f"{name}_{kernel}" in text, (name, kernel)


def test_kernels_lower_to_triton_for_gpu():
    # Lowering only (Pallas -> Triton IR, "loop" driver); compiling that IR needs a GPU.
    _check_lowered(_lowered("cuda", "gpu"), "__gpu$xla.gpu.triton")


def test_kernels_lower_to_mosaic_for_tpu(monkeypatch):
    # Lowering only (Pallas -> Mosaic MLIR, "grid" driver, as on a TPU v5e): this checks every
    # block against Mosaic's tiling rules; Mosaic's own compiler runs on a TPU.
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not hasattr(tpu_info, "registry"):
        pytest.skip("this jax cannot describe a TPU to lower for without one")
    v5e = lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
    monkeypatch.setitem(tpu_info.registry, "cpu", v5e)
    _check_lowered(_lowered("tpu", "tpu"), "tpu_custom_call")
