"""What the chunked linear-recurrence kernels share: configuration, in-kernel math helpers and
the two drivers that turn a per-chunk step into a ``pallas_call``.

Kernel layout. Every per-token array is ``[BH, T, D]`` float32 (batch and value heads flattened,
T a multiple of the chunk C, D a power of two >= 16); states are ``[BH, K, V]``. "Key-side"
arrays (q, k, gate cumsums, reset counts, beta) are read whole along D; "value-side" arrays
(v, o and their cotangents) are split into blocks of ``block_v`` columns, because every
recurrence here acts on the columns of the state independently. A program owns one
(head, value block) pair.

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
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
MIN_TILE = 16  # smallest matmul side Triton accepts; chunks, sub-blocks and head dims are >= this


class Config(NamedTuple):
    """Static kernel settings (hashable: a ``custom_vjp`` non-differentiable argument)."""

    chunk: int  # tokens per chunk, a power of two >= 16
    block_v: int  # value columns per program, a power of two >= 16 dividing V
    interpret: bool  # run through the Pallas interpreter (CPU)
    driver: str  # "loop" or "grid" (see module doc)
    precision: Any  # lax precision or DotAlgorithmPreset of every in-kernel matmul
    num_warps: int  # Triton only
    num_stages: int  # Triton only
    backend: str  # "cpu", "gpu" or "tpu": the platform the kernel is built for


# Defaults a benchmark or a debugging session may change (read when a kernel is traced):
#   interpret: None picks interpret mode on CPU only; True forces it anywhere.
#   gpu_precision: in-kernel matmuls on GPU; 3-pass TF32 keeps float32 accuracy on tensor cores.
#   gpu_block_v, gpu_num_warps, gpu_num_stages: Triton tiling and launch settings.
SETTINGS: dict[str, Any] = {
    "interpret": None,
    "gpu_precision": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "gpu_block_v": 64,
    "gpu_num_warps": 4,
    "gpu_num_stages": 1,
}


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def make_config(
    chunk: int,
    v_dim: int,
    *,
    block_v: int | None = None,
    interpret: bool | None = None,
    driver: str | None = None,
    precision: Any = None,
    num_warps: int | None = None,
    backend: str | None = None,
) -> Config:
    """Defaults by backend (``jax.default_backend()`` unless given) and ``SETTINGS``. CPU:
    interpret mode, "loop", float32 matmuls. GPU: Triton, "loop", 64-column value blocks, 3-pass
    TF32 matmuls. TPU: Mosaic, "grid", whole value rows (lane-dense blocks), float32 matmuls."""
    backend = jax.default_backend() if backend is None else backend
    if interpret is None:
        interpret = backend == "cpu" if SETTINGS["interpret"] is None else SETTINGS["interpret"]
    if driver is None:
        driver = "grid" if backend == "tpu" and not interpret else "loop"
    if block_v is None:
        block_v = min(v_dim, SETTINGS["gpu_block_v"]) if backend == "gpu" else v_dim
    if precision is None:
        on_gpu = backend == "gpu" and not interpret
        precision = SETTINGS["gpu_precision"] if on_gpu else lax.Precision.HIGHEST
    if not (is_power_of_two(chunk) and chunk >= MIN_TILE):
        raise ValueError(f"chunk must be a power of two >= {MIN_TILE}, got {chunk}")
    if not (is_power_of_two(block_v) and block_v >= MIN_TILE and v_dim % block_v == 0):
        raise ValueError(f"block_v must be a power of two >= {MIN_TILE} dividing V={v_dim}, got {block_v}")
    if driver not in ("loop", "grid"):
        raise ValueError(f"driver must be 'loop' or 'grid', got {driver!r}")
    num_warps = SETTINGS["gpu_num_warps"] if num_warps is None else num_warps
    return Config(chunk, block_v, bool(interpret), driver, precision, num_warps, SETTINGS["gpu_num_stages"], backend)


def check_layout(keys: Sequence[jax.Array], values: Sequence[jax.Array], s0: jax.Array, cfg: Config) -> None:
    """Shapes the kernels assume: [BH, T, D] float32 with T % C == 0 and D powers of two."""
    bh, t, dk = keys[0].shape
    dv = values[0].shape[-1]
    if t % cfg.chunk:
        raise ValueError(f"T={t} must be a multiple of the chunk {cfg.chunk}; pad first")
    for x in (*keys, *values):
        if x.dtype != F32 or x.shape[:2] != (bh, t):
            raise ValueError(f"per-token inputs must be float32 [BH={bh}, T={t}, D], got {x.dtype} {x.shape}")
    for name, d in (("K", dk), ("V", dv)):
        if not (is_power_of_two(d) and d >= MIN_TILE):
            raise ValueError(f"{name}={d} must be a power of two >= {MIN_TILE}; pad first")
    if s0.shape != (bh, dk, dv) or s0.dtype != F32:
        raise ValueError(f"s0 must be float32 [{bh}, {dk}, {dv}], got {s0.dtype} {s0.shape}")


# ---------------------------------------------------------------- in-kernel math (2D values)


def row_ids(shape: tuple[int, int]) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, 0)


def col_ids(shape: tuple[int, int]) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, 1)


def masked_exp(x: jax.Array, keep: jax.Array) -> jax.Array:
    """exp(x) where keep, else 0; masked before exp too, so no inf - inf or overflow leaks."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, 0.0)), 0.0)


def take_row(x: jax.Array, i) -> jax.Array:
    """Row i of x [n, m] as [1, m] (a masked sum: no dynamic slicing of values)."""
    return jnp.sum(jnp.where(row_ids(x.shape) == i, x, 0.0), axis=0, keepdims=True)


def take_col(x: jax.Array, j) -> jax.Array:
    """Column j of x [n, m] as [n, 1]."""
    return jnp.sum(jnp.where(col_ids(x.shape) == j, x, 0.0), axis=1, keepdims=True)


def col_to_row(x: jax.Array) -> jax.Array:
    """[n, 1] -> [1, n] without a transpose."""
    n = x.shape[0]
    return jnp.sum(jnp.where(row_ids((n, n)) == col_ids((n, n)), x, 0.0), axis=0, keepdims=True)


def row_to_col(x: jax.Array) -> jax.Array:
    """[1, n] -> [n, 1] without a transpose."""
    n = x.shape[1]
    return jnp.sum(jnp.where(row_ids((n, n)) == col_ids((n, n)), x, 0.0), axis=1, keepdims=True)


def total(x: jax.Array) -> jax.Array:
    """Sum of a 2D value as [1, 1] (one axis at a time, as Triton reduces)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _dot(a: jax.Array, b: jax.Array, contract: tuple, precision: Any) -> jax.Array:
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=F32)


def mm(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """a @ b."""
    return _dot(a, b, ((1,), (0,)), precision)


def mm_nt(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """a @ bᵀ."""
    return _dot(a, b, ((1,), (1,)), precision)


def mm_tn(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """aᵀ @ b."""
    return _dot(a, b, ((0,), (0,)), precision)


class ScalarDecays(NamedTuple):
    """Masked decays of one chunk for a per-head scalar gate."""

    pair: jax.Array  # [C, C] decay(t <- s) for s <= t, 0 across a reset
    query: jax.Array  # [C, 1] decay(t <- chunk start)
    key: jax.Array  # [C, 1] decay(chunk end <- s)
    chunk: jax.Array  # [1, 1] decay(chunk end <- chunk start)


def scalar_decays(b: jax.Array, n: jax.Array) -> ScalarDecays:
    """b: [C, 1] chunk-local cumsum of the log gates (zero at resets); n: [C, 1] reset counts."""
    c = b.shape[0]
    b_row, n_row = col_to_row(b), col_to_row(n)
    keep = jnp.logical_and(row_ids((c, c)) >= col_ids((c, c)), n == n_row)
    b_end, n_end = take_row(b, c - 1), take_row(n, c - 1)
    return ScalarDecays(
        pair=masked_exp(b - b_row, keep),
        query=masked_exp(b, n == 0.0),
        key=masked_exp(b_end - b, n == n_end),
        chunk=masked_exp(b_end, n_end == 0.0),
    )


def last_row(value: jax.Array, rows: int) -> jax.Array:
    """[rows, m] zeros with ``value`` [1, m] in the last row."""
    return jnp.where(row_ids((rows, value.shape[1])) == rows - 1, value, 0.0)


# ---------------------------------------------------------------- pallas_call plumbing


def _compiler_params(cfg: Config, dims: int) -> Any:
    if cfg.interpret:
        return None
    if cfg.backend == "gpu":
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        semantics = ("parallel", "parallel", "arbitrary")[:dims]
        return pltpu.CompilerParams(dimension_semantics=semantics)
    return None


def _vmem(shape: tuple[int, ...]) -> Any:
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.VMEM(shape, F32)


class _Specs:
    """BlockSpecs of one driver. ``chunk_of(i)`` maps the grid's chunk step to a chunk index."""

    def __init__(self, cfg: Config, t: int, reverse: bool):
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


def _launch(cfg: Config, loop_kernel: Callable, grid_kernel: Callable, flags: dict, dims: tuple) -> tuple:
    """(kernel, grid, scratch shapes) of the configured driver; dims = (BH, V, K, N)."""
    bh, v_dim, k_dim, n = dims
    grid = (bh, v_dim // cfg.block_v)
    if cfg.driver == "loop":
        return functools.partial(loop_kernel, chunk=cfg.chunk, n_chunks=n, **flags), grid, []
    return functools.partial(grid_kernel, **flags), (*grid, n), [_vmem((k_dim, cfg.block_v))]


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


def _grid_forward_kernel(*refs, step, n_in, emit_output, emit_states):
    ins, s0_ref, outs = refs[:n_in], refs[n_in], list(refs[n_in + 1 :])
    state_scratch = outs.pop()
    o_ref = outs.pop(0) if emit_output else None
    final_ref = outs.pop(0)
    states_ref = outs.pop(0) if emit_states else None
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        state_scratch[...] = s0_ref[...]

    s = state_scratch[...]
    if states_ref is not None:
        states_ref[...] = s
    state_scratch[...] = step(ins, 0, s, o_ref)

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = state_scratch[...]


def forward_call(
    step: Callable,
    keys: Sequence[jax.Array],
    values: Sequence[jax.Array],
    s0: jax.Array,
    cfg: Config,
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
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        ds_scratch[...] = d_final_ref[...]

    ds_scratch[...] = step(ins, do_ref, grad_refs, 0, state_ref[...], ds_scratch[...])

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = ds_scratch[...]


def backward_call(
    step: Callable,
    keys: Sequence[jax.Array],
    values: Sequence[jax.Array],
    states: jax.Array,
    d_out: jax.Array,
    d_final: jax.Array,
    cfg: Config,
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

    def steps(cfg: Config) -> tuple[Callable, Callable]:
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
