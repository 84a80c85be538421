"""Plumbing shared by every linear-recurrence op: input canonicalisation, impl choice, the
chunk-form driver and output finishing. The math of each op lives in its own folder."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.ops import validation
from jaxlm.ops.chunked import run_chunked
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
    correct form we have (experiments/RESULTS.md) until the Pallas kernels land."""
    if impl == "pallas":
        raise ValueError(
            f"impl='pallas' is not available yet for {op}: the Pallas kernels are not built; "
            "use impl='chunk' (or None)"
        )
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


def finish(o: jax.Array, s_final: jax.Array, v_dtype: Any, output_final_state: bool):
    """o in v's dtype; the final state float32, or None when not asked for."""
    return o.astype(v_dtype), (s_final if output_final_state else None)
