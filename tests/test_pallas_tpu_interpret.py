"""Every kernel's TPU path (the grid, block specs, VMEM scratch and Mosaic dimension semantics it
compiles with on a TPU) run in TPU interpret mode on the CPU, forward and backward, against the
float32 references of test_pallas_recurrences.py and test_pallas_attention.py.

TPU interpret mode simulates TPU memory: HBM, VMEM and the DMAs that move blocks between them,
with unwritten memory reading as NaN (so an output block that is never written fails the
comparison). With two simulated cores, the "parallel" grid axes are split between them and the
race detector reports any two unordered accesses that overlap ("RACE DETECTED" on stdout). It
does not check Mosaic's tiling rules: the lowering tests in those two files do. Shapes are tiny,
as the interpreter is slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlm import ops
from kernels_pallas import kernel_settings
from kernels_pallas.flash_attention import BlockSizes, flash_attention
from numerics import F32_GRAD, F32_OUT, assert_close
from op_cases import attention_formula
from test_pallas_attention import CASES, Case, ids, naive_np, normal
from kernels_pallas.call_layout import pallas_call_eqns
from test_pallas_recurrences import OPS, check_against_recurrent, make_inputs

TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
RACE = "RACE DETECTED"

# (B, T, H, HV, K, V): T = 20 in two 16-token chunks, two value heads reading one q/k head, K
# padded to 16, V = 256 in two 128-column value blocks (the narrowest a TPU block may be).
RECURRENCE_SHAPE = (1, 20, 1, 2, 6, 256)
RECURRENCE_SEGMENTS = np.array([[0] * 9 + [1] * 11], np.int32)


@pytest.fixture(autouse=True)
def fresh_interpreter():
    """A kernel that fails mid-interpretation leaves the simulated TPU's state behind."""
    yield
    pltpu.reset_tpu_interpret_mode_state()


def _assert_tpu_kernels(fn, args, names: list[str]) -> list:
    """The pallas_calls of fn(*args) are ``names``, each the TPU kernel (Mosaic parameters) in
    TPU interpret mode."""
    calls = pallas_call_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
    assert sorted(str(c.params["name"]) for c in calls) == sorted(names)
    for call in calls:
        assert call.params["interpret"] == TPU_INTERPRET
        assert isinstance(call.params["compiler_params"], pltpu.CompilerParams)
    return calls


def _grads(fn, q, k, v, ct):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_race_detector_reports_a_race(capfd):
    # The check the kernel tests rely on: two parallel programs, one per simulated core, write
    # the same output block.
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)

    racy = pl.pallas_call(
        kernel,
        grid=(2,),
        in_specs=[pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=TPU_INTERPRET,
    )
    jax.block_until_ready(racy(jnp.ones((2, 8, 128))))
    assert RACE in capfd.readouterr().out


@pytest.mark.parametrize("op,kernel", [("simple_gla", "simple_gla"), ("gla", "gla"), ("gated_delta_rule", "delta")])
def test_recurrence_tpu_kernels(op, kernel, capfd):
    """The "grid" driver (the TPU default) with split value blocks, grouped value heads and
    packed documents."""
    x = make_inputs(RECURRENCE_SHAPE, seed=1)
    with kernel_settings(interpret=TPU_INTERPRET, block_v=128):
        check_against_recurrent(x, op, 16, RECURRENCE_SEGMENTS)

        def value_and_grad(q):
            loss = lambda q: jnp.sum(OPS[op]({**x, "q": q}, impl="pallas", chunk_size=16)[0])
            return jax.value_and_grad(loss)(q)

        names = [f"{kernel}_forward", f"{kernel}_states_forward", f"{kernel}_backward"]
        calls = _assert_tpu_kernels(value_and_grad, (x["q"],), names)
    assert all(c.params["grid_mapping"].grid == (2, 2, 2) for c in calls)  # (B*HV, value blocks, chunks)
    assert RACE not in capfd.readouterr().out


def _check_attention(case: Case, attend, capfd) -> None:
    q, k, v, seg = case.inputs(0)
    scale = case.d**-0.5 if case.scale is None else case.scale
    mask = case.mask(seg)
    value_and_grad = jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v, seg)), argnums=(0, 1, 2))
    names = ["flash_attention_fwd", "flash_attention_bwd_dq", "flash_attention_bwd_dkv"]
    _assert_tpu_kernels(value_and_grad, (q, k, v), names)
    o = attend(q, k, v, seg)
    assert_close(o, naive_np(q, k, v, mask, scale), F32_OUT, "o")
    hidden = ~mask.any(axis=-1)  # queries that see no key get zeros, and a zero dq
    np.testing.assert_array_equal(np.asarray(o)[hidden], 0.0)
    ct = normal(9, o.shape)
    got = _grads(lambda q, k, v: attend(q, k, v, seg), q, k, v, ct)
    assert_close(got, _grads(lambda *a: attention_formula(*a, mask, scale), q, k, v, ct), F32_GRAD, "dq, dk, dv")
    np.testing.assert_array_equal(np.asarray(got[0])[hidden], 0.0)
    assert RACE not in capfd.readouterr().out


def test_flash_attention_tpu_kernels_default_tiles(capfd):
    # Through ops with the TPU's own 128-row tiles: T = 150 spans two query and two key tiles
    # (the second mostly padding); GQA, a window and two documents.
    case = Case(1, 150, 4, 2, 16, 16, window=100, segments=(ids((70, 0), (80, 1)),))

    def attend(q, k, v, seg):
        return ops.attention(q, k, v, impl="pallas", **case.kwargs(seg))

    with kernel_settings(interpret=TPU_INTERPRET):
        _check_attention(case, attend, capfd)


def test_flash_attention_tpu_kernels_cross_window(capfd):
    # Non-causal cross attention (19 keys in one 128-key tile) with a window, 16-row query tiles:
    # queries from t = 23 on see no key.
    case = CASES["cross_window_rows_without_keys"]
    blocks = BlockSizes(block_q=16, block_k=128, block_q_bwd=16, block_k_bwd=128)

    def attend(q, k, v, seg):
        return flash_attention(q, k, v, seg, causal=case.causal, window=case.window, block_sizes=blocks,
                               interpret=TPU_INTERPRET)

    _check_attention(case, attend, capfd)
