"""The helpers of the kernels notebook (colab/02_kernels.ipynb): kernels_pallas.call_layout, which
reads a kernel's grid, blocks, scratch and in-kernel loop from its traced pallas_call, and
experiments/pallas_kernels.py (impl="pallas" against impl="chunk", the layouts of the recurrence
kernels, the timing rows and the figures)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from experiments import pallas_kernels as pk
from kernels_pallas.call_layout import kernel_layouts, layout_of

matplotlib.use("Agg")


def _toy_call(x):
    """grid (2, 3); blocks of [·, 4, 8] walked in reverse along axis 1; a VMEM scratch; a loop."""

    def kernel(x_ref, o_ref, acc_ref):
        acc_ref[...] = jnp.zeros_like(acc_ref)
        o_ref[...] = lax.fori_loop(0, 5, lambda i, a: a + x_ref[...], acc_ref[...])

    return pl.pallas_call(
        kernel,
        grid=(2, 3),
        in_specs=[pl.BlockSpec((None, 4, 8), lambda i, j: (i, 2 - j, 0))],
        out_specs=pl.BlockSpec((None, 4, 8), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((2, 12, 8), jnp.float32),
        scratch_shapes=[pltpu.VMEM((4, 8), jnp.float32)],
        interpret=True,
        name="toy",
    )(x)


def test_layout_of_a_hand_written_call():
    x = jnp.arange(2 * 12 * 8, dtype=jnp.float32).reshape(2, 12, 8)
    (layout,) = kernel_layouts(jax.jit(_toy_call), x)  # found inside the jit
    assert layout.name == "toy" and layout.grid == (2, 3) and layout.programs == 6
    assert layout.interpret == "HLO interpreter" and layout.dimension_semantics is None
    (src,), (dst,) = layout.inputs, layout.outputs
    assert src.array_shape == (2, 12, 8) and src.block == (None, 4, 8) and src.dtype == "float32"
    assert src.index_map == "(⟨0⟩, ⟨1⟩) -> (⟨0⟩, 2 - ⟨1⟩, 0)"
    assert dst.index_map == "(⟨0⟩, ⟨1⟩) -> (⟨0⟩, ⟨1⟩, 0)"
    assert layout.scratch == (((4, 8), "float32", "vmem"),)
    (loop,) = layout.loops
    assert loop.length == 5 and ((4, 8), "float32") in loop.carry
    text = layout.describe(("row", "col"), ["x"], ["o"])
    assert "grid (2 row, 3 col) = 6 programs" in text
    assert "x (args[0])" in text and "block [·, 4, 8] at (row, col) -> (row, 2 - col, 0)" in text
    assert "in-kernel loop of 5 steps" in text and "scratch float32[4, 8] in vmem" in text
    # the call itself still computes what it says: block (i, 2 - j) of x, five times
    np.testing.assert_allclose(_toy_call(x)[:, :4], 5 * x[:, 8:])


def test_layout_arguments_are_checked():
    x = jnp.zeros((2, 12, 8), jnp.float32)
    (layout,) = kernel_layouts(_toy_call, x)
    with pytest.raises(ValueError, match="axis_names"):
        layout.describe(("row",))
    with pytest.raises(ValueError, match="input_names"):
        layout.describe(None, ["x", "y"])
    eqn = jax.make_jaxpr(lambda x: x + 1)(x).jaxpr.eqns[0]
    with pytest.raises(ValueError, match="pallas_call"):
        layout_of(eqn)


def test_recurrence_layouts_under_both_drivers():
    """T=40 at chunk 16 is padded to 48: 3 chunks; B*H = 4 programs' rows; K = V = 64."""
    loop = pk.layouts("simple_gla", 40, driver="loop", chunk_size=16)
    grid = pk.layouts("simple_gla", 40, driver="grid", chunk_size=16)
    names = ["simple_gla_forward", "simple_gla_states_forward", "simple_gla_backward"]
    assert [x.name for x in loop] == names and [x.name for x in grid] == names
    assert all(x.grid == (4, 1) and not x.scratch for x in loop)
    assert all(x.grid == (4, 1, 3) and x.scratch == (((64, 64), "float32", "vmem"),) for x in grid)
    fwd_loop, fwd_grid = loop[0], grid[0]
    assert fwd_loop.inputs[0].block == (None, 48, 64)  # the whole (padded) sequence of one head
    assert fwd_loop.loops[0].length == 3 and ((64, 64), "float32") in fwd_loop.loops[0].carry
    assert fwd_grid.inputs[0].block == (None, 16, 64)  # one chunk of q
    assert fwd_grid.inputs[0].index_map == "(⟨0⟩, ⟨1⟩, ⟨2⟩) -> (⟨0⟩, ⟨2⟩, 0)"
    assert grid[2].inputs[0].index_map == "(⟨0⟩, ⟨1⟩, ⟨2⟩) -> (⟨0⟩, 2 - ⟨2⟩, 0)"  # the backward walks back
    text = pk.describe_forward("simple_gla", fwd_grid)
    assert "grid (4 head, 1 value block, 3 chunk)" in text and "s0 (args[5])" in text
    assert "final state (outputs[1])" in text
    assert len(pk.layouts("gated_delta_rule", 40, chunk_size=16)[0].inputs) == len(pk.FORWARD_OPERANDS["gated_delta_rule"][0])
    assert pk._chunk_walk(fwd_grid) == (48, 16, 3, (64, 64), "vmem scratch")
    assert pk._chunk_walk(fwd_loop) == (48, 16, 3, (64, 64), "the loop's carry")
    fig = pk.plot_chunk_walk({"grid": fwd_grid, "loop": fwd_loop})
    assert len(fig.axes) == 2 and "3 chunks" in fig._suptitle.get_text()


def test_agreement_on_cpu_is_interpreted_and_within_the_contract():
    assert pk.mode() == "interpreted"
    err = pk.agreement("simple_gla", 20, gradients=True)
    assert set(err) == {"o", "final state", "dq", "dk", "dv", "dg"}
    assert all(e["ok"] for e in err.values()), err
    assert err["o"]["tol"] == 1e-5 and err["dg"]["tol"] == 1e-4
    assert all(e["rel_rms"] <= e["tol"] or e["max_abs"] <= 1e-6 for e in err.values())
    bf16 = pk.bf16_agreement("simple_gla", 20)
    assert bf16["ok"] and 0 < bf16["rel_rms"] <= 5e-3  # bf16 rounding shows, within the contract


def test_passes_rejects_a_disagreement():
    b = np.linspace(-1.0, 1.0, 64)
    assert pk._passes(b + 1e-7, b, 1e-5)
    assert not pk._passes(b * 1.01, b, 1e-5)
    assert not pk._passes(np.where(b > 0, np.nan, b), b, 1e-5)


def test_speedups_and_the_time_plot():
    rows = [dict(impl="pallas", T=64, seconds=1.0), dict(impl="pallas", T=128, seconds=2.0),
            dict(impl="chunk", T=64, seconds=3.0), dict(impl="chunk", T=128, seconds=3.0)]
    assert pk.speedups(rows) == {64: 3.0, 128: 1.5}
    fig = pk.plot_times(rows, "simple_gla")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ['impl="pallas" (interpreted)', 'impl="chunk"']


def test_bad_arguments():
    with pytest.raises(ValueError, match="op must be one of"):
        pk.agreement("kda_fast", 16)
    with pytest.raises(ValueError, match="t must be a positive int"):
        pk.agreement("gla", 0)
    with pytest.raises(ValueError, match="seq_lens"):
        pk.time_against_length("gla", [])
    with pytest.raises(ValueError, match="repeats"):
        pk.time_against_length("gla", [16], repeats=0)


def test_scan_carry_without_num_carry():
    """A JAX version whose scan has no num_carry parameter: the carry is read off the shapes."""
    from kernels_pallas.call_layout import _scan_carry_count

    jaxpr = jax.make_jaxpr(lambda c, xs: lax.scan(lambda c, x: (c + x, c * x), c, xs))(jnp.zeros(3), jnp.ones((5, 3)))
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert _scan_carry_count(eqn) == 1
    stripped = eqn.replace(params={k: v for k, v in eqn.params.items() if k != "num_carry"})
    assert _scan_carry_count(stripped) == 1


def test_layouts_for_the_compiled_targets_trace_on_cpu():
    """The layouts a GPU (Triton) or TPU (Mosaic) runtime shows, traced here without compiling."""
    from kernels_pallas import kernel_settings

    with kernel_settings(backend="tpu", interpret=False):
        tpu = pk.layouts("simple_gla", 40, chunk_size=16)
    assert tpu[0].grid == (4, 1, 3) and tpu[0].interpret == "compiled"
    assert tpu[0].dimension_semantics == ("parallel", "parallel", "arbitrary")
    with kernel_settings(backend="gpu", interpret=False):
        gpu = pk.layouts("gla", 40, chunk_size=16)
    assert gpu[0].grid == (4, 1) and gpu[0].loops[0].length == 3 and gpu[0].dimension_semantics is None
