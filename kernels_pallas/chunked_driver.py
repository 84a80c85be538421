"""The two drivers that turn a per-chunk step of a linear recurrence into a ``pallas_call``, and
the ``jax.custom_vjp`` that joins a forward and a backward step (layout: recurrence_config.py).

Drivers (same step functions, two ways to walk the chunks):
  "loop": grid (BH, V/BV); a ``fori_loop`` over chunks carries the state. Blocks hold a whole
          sequence, which on GPU (Triton) is just a pointer: the steps load one chunk at a time.
  "grid": grid (BH, V/BV, N) with the chunk axis sequential ("arbitrary") and the state in a
          VMEM scratch buffer: the TPU layout, where a block must fit in VMEM.

Steps. ``forward_step(refs, start, s, o_ref) -> s_next`` reads chunk rows [start, start + C) of
the input refs, writes that chunk's output to ``o_ref`` (unless None) and returns the next state.
``backward_step(refs, do_ref, grad_refs, start, s, ds_next) -> ds`` gets the chunk's start state
(recomputed by a forward pass that stores only the N start states) and the cotangent of its end
state, writes the chunk's input cotangents and returns the cotangent of its start state. Key-side
cotangents are partial sums over value blocks, shaped ``[V/BV, BH, T, D]``; callers sum axis 0.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.recurrence_config import RecurrenceConfig, check_layout
from kernels_pallas.tile_math import F32


def _compiler_params(cfg: RecurrenceConfig, dims: int) -> Any:
    """Triton or Mosaic parameters; TPU interpret mode reads the Mosaic dimension semantics too
    (it splits the "parallel" axes over its simulated cores)."""
    if cfg.interpret is True:
        return None
    if cfg.backend == "gpu":
        return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.backend == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")[:dims])
    return None


class _Specs:
    """BlockSpecs of one driver. ``chunk_of(i)`` maps the grid's chunk step to a chunk index."""

    def __init__(self, cfg: RecurrenceConfig, t: int, reverse: bool):
        self.loop = cfg.driver == "loop"
        self.rows = t if self.loop else cfg.chunk
        self.bv = cfg.block_v
        n = t // cfg.chunk
        self.chunk_of = (lambda i: n - 1 - i) if reverse else (lambda i: i)

    def key(self, d: int) -> pl.BlockSpec:
        if self.loop:
            return pl.BlockSpec((None, self.rows, d), lambda h, j: (h, 0, 0))
        return pl.BlockSpec((None, self.rows, d), lambda h, j, i: (h, self.chunk_of(i), 0))

    def value(self) -> pl.BlockSpec:
        if self.loop:
            return pl.BlockSpec((None, self.rows, self.bv), lambda h, j: (h, 0, j))
        return pl.BlockSpec((None, self.rows, self.bv), lambda h, j, i: (h, self.chunk_of(i), j))

    def key_partial(self, d: int) -> pl.BlockSpec:
        if self.loop:
            return pl.BlockSpec((None, None, self.rows, d), lambda h, j: (j, h, 0, 0))
        return pl.BlockSpec((None, None, self.rows, d), lambda h, j, i: (j, h, self.chunk_of(i), 0))

    def state(self, k: int) -> pl.BlockSpec:
        if self.loop:
            return pl.BlockSpec((None, k, self.bv), lambda h, j: (h, 0, j))
        return pl.BlockSpec((None, k, self.bv), lambda h, j, i: (h, 0, j))

    def states(self, n: int, k: int) -> pl.BlockSpec:
        """The [BH, N, K, V] start states: all of them ("loop") or the current chunk's ("grid")."""
        if self.loop:
            return pl.BlockSpec((None, n, k, self.bv), lambda h, j: (h, 0, 0, j))
        return pl.BlockSpec((None, None, k, self.bv), lambda h, j, i: (h, self.chunk_of(i), 0, j))


def _launch(cfg: RecurrenceConfig, loop_kernel: Callable, grid_kernel: Callable, flags: dict, dims: tuple) -> tuple:
    """(kernel, grid, scratch shapes) of the configured driver; dims = (BH, V, K, N)."""
    bh, v_dim, k_dim, n = dims
    grid = (bh, v_dim // cfg.block_v)
    if cfg.driver == "loop":
        return functools.partial(loop_kernel, chunk=cfg.chunk, n_chunks=n, **flags), grid, []
    return functools.partial(grid_kernel, **flags), (*grid, n), [pltpu.VMEM((k_dim, cfg.block_v), F32)]


def _loop_forward_kernel(*refs, step, n_in, chunk, n_chunks, emit_output, emit_states):
    ins, s0_ref, outs = refs[:n_in], refs[n_in], list(refs[n_in + 1 :])
    o_ref = outs.pop(0) if emit_output else None
    final_ref = outs.pop(0)
    states_ref = outs.pop(0) if emit_states else None

    def body(i, s):
        if states_ref is not None:
            states_ref[i] = s
        return step(ins, pl.multiple_of(i * chunk, chunk), s, o_ref)

    final_ref[...] = lax.fori_loop(0, n_chunks, body, s0_ref[...])


def _carry_over_grid(scratch: Any, first_ref: Any, last_ref: Any, update: Callable) -> None:
    """One step of the sequential grid axis 2, carrying a value in VMEM scratch: taken from
    first_ref at the first step, replaced by update(value), written to last_ref after the last."""
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        scratch[...] = first_ref[...]

    scratch[...] = update(scratch[...])

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        last_ref[...] = scratch[...]


def _grid_forward_kernel(*refs, step, n_in, emit_output, emit_states):
    ins, s0_ref, outs = refs[:n_in], refs[n_in], list(refs[n_in + 1 :])
    state_scratch = outs.pop()
    o_ref = outs.pop(0) if emit_output else None
    final_ref = outs.pop(0)
    states_ref = outs.pop(0) if emit_states else None

    def update(s):
        if states_ref is not None:
            states_ref[...] = s
        return step(ins, 0, s, o_ref)

    _carry_over_grid(state_scratch, s0_ref, final_ref, update)


def forward_call(
    step: Callable,
    keys: Sequence[jax.Array],
    values: Sequence[jax.Array],
    s0: jax.Array,
    cfg: RecurrenceConfig,
    *,
    emit_output: bool,
    emit_states: bool,
    name: str,
) -> tuple[jax.Array, ...]:
    """Runs a forward step over all chunks.

    keys: key-side [BH, T, Dk_i]; values: value-side [BH, T, V]; s0: [BH, K, V].
    Returns (o [BH, T, V] if emit_output, final state [BH, K, V],
    start states [BH, N, K, V] if emit_states).
    """
    check_layout(keys, values, s0, cfg)
    bh, t, _ = keys[0].shape
    k_dim, v_dim = s0.shape[1:]
    n = t // cfg.chunk
    sp = _Specs(cfg, t, reverse=False)
    out_shape, out_specs = [], []
    if emit_output:
        out_shape.append(jax.ShapeDtypeStruct((bh, t, v_dim), F32))
        out_specs.append(sp.value())
    out_shape.append(jax.ShapeDtypeStruct((bh, k_dim, v_dim), F32))
    out_specs.append(sp.state(k_dim))
    if emit_states:
        out_shape.append(jax.ShapeDtypeStruct((bh, n, k_dim, v_dim), F32))
        out_specs.append(sp.states(n, k_dim))
    flags = dict(step=step, n_in=len(keys) + len(values), emit_output=emit_output, emit_states=emit_states)
    kernel, grid, scratch = _launch(cfg, _loop_forward_kernel, _grid_forward_kernel, flags, (bh, v_dim, k_dim, n))
    return pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=grid,
        in_specs=[*(sp.key(x.shape[-1]) for x in keys), *(sp.value() for _ in values), sp.state(k_dim)],
        out_specs=tuple(out_specs),
        scratch_shapes=scratch,
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, len(grid)),
        name=f"{name}_forward",
    )(*keys, *values, s0)


def _loop_backward_kernel(*refs, step, n_in, n_grads, chunk, n_chunks):
    ins = refs[:n_in]
    states_ref, do_ref, d_final_ref = refs[n_in : n_in + 3]
    grad_refs, ds0_ref = refs[n_in + 3 : n_in + 3 + n_grads], refs[-1]

    def body(j, ds_next):
        i = n_chunks - 1 - j
        return step(ins, do_ref, grad_refs, pl.multiple_of(i * chunk, chunk), states_ref[i], ds_next)

    ds0_ref[...] = lax.fori_loop(0, n_chunks, body, d_final_ref[...])


def _grid_backward_kernel(*refs, step, n_in, n_grads):
    ins = refs[:n_in]
    state_ref, do_ref, d_final_ref = refs[n_in : n_in + 3]
    grad_refs = refs[n_in + 3 : n_in + 3 + n_grads]
    ds0_ref, ds_scratch = refs[-2], refs[-1]
    update = lambda ds_next: step(ins, do_ref, grad_refs, 0, state_ref[...], ds_next)
    _carry_over_grid(ds_scratch, d_final_ref, ds0_ref, update)


def backward_call(
    step: Callable,
    keys: Sequence[jax.Array],
    values: Sequence[jax.Array],
    states: jax.Array,
    d_out: jax.Array,
    d_final: jax.Array,
    cfg: RecurrenceConfig,
    *,
    n_key_grads: int,
    name: str,
) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """Runs a backward step over the chunks in reverse.

    states: [BH, N, K, V] chunk start states; d_out: [BH, T, V]; d_final: [BH, K, V].
    Returns (cotangents of the first ``n_key_grads`` keys, summed over value blocks;
    cotangents of the values; cotangent of s0).
    """
    bh, t, _ = keys[0].shape
    k_dim, v_dim = d_final.shape[1:]
    n, nv = t // cfg.chunk, v_dim // cfg.block_v
    sp = _Specs(cfg, t, reverse=True)
    key_grads = [jax.ShapeDtypeStruct((nv, *x.shape), F32) for x in keys[:n_key_grads]]
    value_grads = [jax.ShapeDtypeStruct(x.shape, F32) for x in values]
    out_shape = (*key_grads, *value_grads, jax.ShapeDtypeStruct((bh, k_dim, v_dim), F32))
    out_specs = (
        *(sp.key_partial(x.shape[-1]) for x in key_grads),
        *(sp.value() for _ in values),
        sp.state(k_dim),
    )
    in_specs = [
        *(sp.key(x.shape[-1]) for x in keys),
        *(sp.value() for _ in values),
        sp.states(n, k_dim),
        sp.value(),
        sp.state(k_dim),
    ]
    flags = dict(step=step, n_in=len(keys) + len(values), n_grads=len(key_grads) + len(value_grads))
    kernel, grid, scratch = _launch(cfg, _loop_backward_kernel, _grid_backward_kernel, flags, (bh, v_dim, k_dim, n))
    *grads, ds0 = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, len(grid)),
        name=f"{name}_backward",
    )(*keys, *values, states, d_out, d_final)
    partial, full = grads[:n_key_grads], grads[n_key_grads:]
    return [g.sum(axis=0) for g in partial], full, ds0


def chunked_recurrence(name: str, forward_step: Callable, backward_step: Callable, n_diff_keys: int) -> Callable:
    """Joins a forward and a backward step into ``run(keys, v, s0, cfg) -> (o, final state)``
    with a ``jax.custom_vjp``.

    The forward is one kernel. The VJP saves only the inputs: the backward runs the forward
    step again in a states-only kernel (the N chunk start states, memory T/C·K·V), then the
    backward kernel over the chunks in reverse. The first ``n_diff_keys`` key-side inputs are
    differentiable; the rest (reset counts) get zero cotangents.
    """

    def steps(cfg: RecurrenceConfig) -> tuple[Callable, Callable]:
        options = dict(chunk=cfg.chunk, precision=cfg.precision)
        return functools.partial(forward_step, **options), functools.partial(backward_step, **options)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def run(keys, v, s0, cfg):
        return forward_call(steps(cfg)[0], keys, (v,), s0, cfg, emit_output=True, emit_states=False, name=name)

    def run_fwd(keys, v, s0, cfg):
        return run(keys, v, s0, cfg), (keys, v, s0)

    def run_bwd(cfg, residuals, cotangents):
        keys, v, s0 = residuals
        d_out, d_final = cotangents
        fwd, bwd = steps(cfg)
        _, states = forward_call(fwd, keys, (v,), s0, cfg, emit_output=False, emit_states=True, name=f"{name}_states")
        d_keys, (dv,), ds0 = backward_call(
            bwd, keys, (v,), states, d_out, d_final, cfg, n_key_grads=n_diff_keys, name=name
        )
        return (*d_keys, *(jnp.zeros_like(x) for x in keys[n_diff_keys:])), dv, ds0

    run.defvjp(run_fwd, run_bwd)
    return run
