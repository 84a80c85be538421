"""Plumbing shared by every linear-recurrence op: input canonicalisation, the default form lists,
the chunk-form and Pallas-kernel drivers and output finishing. The math of each op lives in its
own folder (and, for the kernels, in kernels_pallas); each family's forms are registered in a
``dispatch.FormTable`` in its api.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import kernels_pallas.delta
import kernels_pallas.gla
import kernels_pallas.kda
import kernels_pallas.simple_gla
from jaxlm.ops import nonfinite, validation
from jaxlm.ops.chunked import run_chunked
from jaxlm.ops.dispatch import FormTable, FormUnavailable
from jaxlm.ops.gate_cumsum import chunk_cumsums
from jaxlm.ops.sequence import (
    effective_chunk_size,
    from_chunks,
    pad_time,
    repeat_heads,
    segment_starts,
    to_chunks,
)
from jaxlm.typing import QK, Beta, HeadQK, Resets, ScalarGate, SegmentIds, State, TokenGate, Values, VectorGate


class Canonical(NamedTuple):
    """Float32 inputs with q/k expanded to the HV value heads and q already scaled."""

    q: HeadQK  # [B, T, HV, K]
    k: HeadQK  # [B, T, HV, K]
    v: Values  # [B, T, HV, V]
    reset: Resets  # [B, T] bool
    s0: State  # [B, HV, K, V]


def per_channel_gate(g: ScalarGate | VectorGate) -> TokenGate:
    """A gate per head [B, T, HV] as the token and chunk forms' per-key-channel layout [B, T, HV, 1];
    a per-channel gate [B, T, HV, K] as it is."""
    return g[..., None] if g.ndim == 3 else g


# impl=None: XLA's chunk form on the CPU; the Pallas kernel first on GPU and TPU, the chunk form
# where the kernel cannot take the inputs.
RECURRENCE_DEFAULTS = {"cpu": ("chunk",), "gpu": ("pallas", "chunk"), "tpu": ("pallas", "chunk")}


def check_common(q, k, v, *, forms: FormTable, scale, initial_state, segment_ids, impl, chunk_size):
    """Validates the arguments every recurrence shares, impl against the family's ``forms``.
    Returns (B, T, H, K, HV, V)."""
    dims = validation.check_qkv(q, k, v)
    b, t, _, dk, hv, dv = dims
    validation.check_scale(scale)
    validation.check_initial_state(initial_state, (b, hv, dk, dv))
    validation.check_segment_ids(segment_ids, b, t)
    forms.candidates(impl)
    validation.check_chunk_size(chunk_size)
    return dims


def run_chunk_form(
    prepare: Callable, advance: Callable, readout: Callable, per_token: tuple, reset: Resets, s0: State,
    chunk_size: int | None,
) -> tuple[Values, State]:
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
    "kda": (kernels_pallas.kda, "kda"),
}
# Kernel tiles are powers of two of at least this size (Triton's smallest matmul side).
KERNEL_MIN_TILE = 16
# The widest (padded) K or V the kernels take: a program holds a [K, V-block] state and [C, K]
# tiles of q and k, which past 256 no longer fit a GPU's registers or a TPU core's VMEM budget.
KERNEL_MAX_HEAD_DIM = 256


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


def run_pallas(
    family: str, c: Canonical, g: ScalarGate | VectorGate, chunk_size: int | None, beta: Beta | None = None
) -> tuple[Values, State]:
    """Runs the Pallas kernel of an op family ("simple_gla", "gla", "delta" or "kda"); raises
    FormUnavailable for head dims past KERNEL_MAX_HEAD_DIM.

    g: [B, T, HV] scalar or [B, T, HV, K] vector log gates, float32; beta: [B, T, HV] for the
    delta rules and KDA. The kernel layout is [B*HV, T, D] with T padded to whole chunks (of at
    least 16 tokens) and K, V padded with zeros to powers of two >= 16; zero keys and values leave
    the state as it is, so the padding changes nothing. Returns o [B, T, HV, V] and the final state.
    """
    b, t, hv, dk = c.q.shape
    dv = c.v.shape[-1]
    if max(dk, dv) > KERNEL_MAX_HEAD_DIM:
        raise FormUnavailable(f"the kernels take head dims up to {KERNEL_MAX_HEAD_DIM}, got K={dk}, V={dv}")
    module, name = _PALLAS_KERNELS[family]
    kernel = getattr(module, name)
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


def run_forms(
    forms: FormTable,
    impl: Any,
    q: QK,
    k: QK,
    v: Values,
    *,
    scale: float | None,
    initial_state: State | None,
    segment_ids: SegmentIds | None,
    chunk_size: int | None,
    output_final_state: bool,
    log_gate: ScalarGate | VectorGate | None = None,
    beta: Beta | None = None,
) -> tuple[Values, State | None]:
    """The shared body of the public recurrences, after their arguments are validated: the inputs
    as every form takes them (Canonical, float32, non-finite values isolated by ops.nonfinite so
    that every array handed on is finite), the form ``impl`` picks from ``forms`` run on
    (Canonical, log_gate, beta), those given, and the outputs finished: o in v's dtype, the final
    state float32 (or None when not asked for), each NaN where the non-finite inputs reach.

    log_gate: [B, T, HV] or [B, T, HV, K] log decays, or None; beta: [B, T, HV] or None.
    """
    v_dtype = v.dtype
    b, t, h, dk = q.shape
    hv, dv = v.shape[2:]
    groups = hv // h
    scale = dk**-0.5 if scale is None else scale
    f32 = jnp.float32
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    reset = segment_starts(segment_ids, b, t)

    (q, query_bad), (k, key_bad), (v, value_bad) = (nonfinite.isolate(x, 3) for x in (q, k, v))
    if initial_state is None:
        # A zero start state needs no check: XLA would constant-fold isfinite over all of it,
        # which at training sizes took over a second of every compile.
        s0, state_bad = jnp.zeros((b, hv, dk, dv), f32), None
    else:
        s0, state_bad = nonfinite.isolate(initial_state.astype(f32), 2)
    query_bad = repeat_heads(query_bad, groups)
    write_bad = repeat_heads(key_bad, groups) | value_bad
    if log_gate is not None:
        log_gate = log_gate.astype(f32)
        bad_gate = nonfinite.bad_log_gate(log_gate)
        write_bad = write_bad | nonfinite.any_trailing(bad_gate, 3)
        log_gate = jnp.where(bad_gate, 0.0, log_gate)
    if beta is not None:
        beta = beta.astype(f32)
        beta, beta_bad = nonfinite.isolate(beta, 3)
        write_bad = write_bad | beta_bad
    reached = nonfinite.reached_in_document(write_bad, reset, state_bad)
    poison = nonfinite.Poison(output=reached | query_bad, final_state=reached[:, -1])

    q = repeat_heads(q * scale, groups)
    k = repeat_heads(k, groups)
    c = Canonical(q, k, v, reset, s0)
    gates = tuple(x for x in (log_gate, beta) if x is not None)
    o, s_final = forms.run(impl, c, *gates, chunk_size=chunk_size)
    o, s_final = poison.apply(o, s_final)
    return o.astype(v_dtype), (s_final if output_final_state else None)
