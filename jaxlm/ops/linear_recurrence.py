"""Plumbing shared by every linear-recurrence op: input canonicalisation, impl choice, the
chunk-form and Pallas-kernel drivers and output finishing. The math of each op lives in its own
folder (and, for the kernels, in kernels_pallas)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import kernels_pallas.delta
import kernels_pallas.gla
import kernels_pallas.simple_gla
from jaxlm.ops import validation
from jaxlm.ops.chunked import run_chunked
from jaxlm.ops.gate_cumsum import chunk_cumsums
from jaxlm.ops.sequence import (
    effective_chunk_size,
    from_chunks,
    pad_time,
    repeat_heads,
    segment_starts,
    to_chunks,
)


class Canonical(NamedTuple):
    """Float32 inputs with q/k expanded to the HV value heads and q already scaled."""

    q: jax.Array  # [B, T, HV, K]
    k: jax.Array  # [B, T, HV, K]
    v: jax.Array  # [B, T, HV, V]
    reset: jax.Array  # [B, T] bool
    s0: jax.Array  # [B, HV, K, V]


def check_common(q, k, v, *, scale, initial_state, segment_ids, impl, chunk_size):
    """Validates the arguments every recurrence shares. Returns (B, T, H, K, HV, V)."""
    dims = validation.check_qkv(q, k, v)
    b, t, _, dk, hv, dv = dims
    validation.check_scale(scale)
    validation.check_initial_state(initial_state, (b, hv, dk, dv))
    validation.check_segment_ids(segment_ids, b, t)
    validation.check_impl(impl, validation.RECURRENCE_IMPLS)
    validation.check_chunk_size(chunk_size)
    return dims


def canonicalize(q, k, v, *, scale, initial_state, segment_ids) -> Canonical:
    b, t, h, dk = q.shape
    hv, dv = v.shape[2:]
    scale = dk**-0.5 if scale is None else scale
    f32 = jnp.float32
    q = repeat_heads(q.astype(f32) * scale, hv // h)
    k = repeat_heads(k.astype(f32), hv // h)
    s0 = jnp.zeros((b, hv, dk, dv), f32) if initial_state is None else initial_state.astype(f32)
    return Canonical(q, k, v.astype(f32), segment_starts(segment_ids, b, t), s0)


def resolve_impl(impl: str | None, op: str) -> str:
    """The form to run. ``None`` picks the chunk form: on every platform it is the fastest
    correct form measured so far (experiments/RESULTS.md); the Pallas kernels run only when asked
    for with ``impl="pallas"`` (interpret mode on CPU) until a benchmark shows them faster."""
    del op  # every recurrence op has every form
    return "chunk" if impl is None else impl


def run_chunk_form(
    prepare: Callable, advance: Callable, readout: Callable, per_token: tuple, reset, s0, chunk_size: int
):
    """Pads [B, T, ...] inputs to whole chunks, runs the chunked recurrence, trims the output.

    per_token: float arrays [B, T, ...]; padding tokens are zeros, which leave the state as is.
    """
    t = reset.shape[1]
    c = effective_chunk_size(chunk_size, t)
    xs = tuple(to_chunks(pad_time(x, c), c) for x in (*per_token, reset.astype(jnp.float32)))
    o, s_final = run_chunked(prepare, advance, readout, xs, s0)
    return from_chunks(o)[:, :t], s_final


# The kernel of each op family: (module, function name), looked up at call time.
_PALLAS_KERNELS = {
    "simple_gla": (kernels_pallas.simple_gla, "simple_gla"),
    "gla": (kernels_pallas.gla, "gla"),
    "delta": (kernels_pallas.delta, "gated_delta_rule"),
}
# Kernel tiles are powers of two of at least this size (Triton's smallest matmul side).
KERNEL_MIN_TILE = 16


def _padded_dim(d: int) -> int:
    return max(KERNEL_MIN_TILE, 1 << (d - 1).bit_length())


def _heads_major(x: jax.Array, length: int, dim: int) -> jax.Array:
    """[B, T, HV, D] -> [B*HV, length, dim], zero-padded in time and in D."""
    b, t, hv, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, length - t), (0, 0), (0, dim - d)))
    return jnp.swapaxes(x, 1, 2).reshape(b * hv, length, dim)


def _kernel_cumsums(g: jax.Array, reset: jax.Array, chunk: int):
    """Chunk-local reset-aware cumsums (see gate_cumsum) of g [B, T, HV(, K)], padded to whole
    chunks with gates of 0. Returns (b, count), each shaped like the padded g."""
    g = pad_time(g, chunk)
    reset = pad_time(reset, chunk)
    shape = g.shape
    lead = (shape[0] * (shape[1] // chunk), chunk)
    reset = reset.reshape(*lead, *([1] * (g.ndim - 2)))
    b, count = chunk_cumsums(g.reshape(*lead, *shape[2:]), reset)
    return b.reshape(shape), count.reshape(shape)


def run_pallas(family: str, c: Canonical, g: jax.Array, chunk_size: int, beta: jax.Array | None = None):
    """Runs the Pallas kernel of an op family ("simple_gla", "gla" or "delta").

    g: [B, T, HV] scalar or [B, T, HV, K] vector log gates, float32; beta: [B, T, HV] for the
    delta rules. The kernel layout is [B*HV, T, D] with T padded to whole chunks (of at least 16
    tokens) and K, V padded with zeros to powers of two >= 16; zero keys and values leave the
    state as it is, so the padding changes nothing. Returns o [B, T, HV, V] and the final state.
    """
    module, name = _PALLAS_KERNELS[family]
    kernel = getattr(module, name)
    b, t, hv, dk = c.q.shape
    dv = c.v.shape[-1]
    chunk = max(KERNEL_MIN_TILE, effective_chunk_size(chunk_size, t))
    length = -(-t // chunk) * chunk
    kp, vp = _padded_dim(dk), _padded_dim(dv)
    cum, count = _kernel_cumsums(g, c.reset, chunk)
    gate_dim = kp if g.ndim == 4 else 1

    def gate_layout(x):
        return _heads_major(x if x.ndim == 4 else x[..., None], length, gate_dim)

    args = [_heads_major(c.q, length, kp), _heads_major(c.k, length, kp), _heads_major(c.v, length, vp)]
    args += [gate_layout(cum), gate_layout(count)]
    if beta is not None:
        args.append(_heads_major(beta[..., None], length, 1))
    s0 = jnp.pad(c.s0, ((0, 0), (0, 0), (0, kp - dk), (0, vp - dv))).reshape(b * hv, kp, vp)
    o, s = kernel(*args, s0, chunk=chunk)
    o = jnp.swapaxes(o.reshape(b, hv, length, vp), 1, 2)[:, :t, :, :dv]
    return o, s.reshape(b, hv, kp, vp)[:, :, :dk, :dv]


def finish(o: jax.Array, s_final: jax.Array, v_dtype: Any, output_final_state: bool):
    """o in v's dtype; the final state float32, or None when not asked for."""
    return o.astype(v_dtype), (s_final if output_final_state else None)
