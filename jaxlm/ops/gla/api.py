"""Public ops for diagonal-gate recurrences: linear attention, simple GLA and GLA.

All three are S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ with o_t = S_tᵀ (scale·q_t): no gate,
one log decay per head and step, and one per key channel. Shapes follow docs/architecture.md.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlm.ops import linear_recurrence as lr
from jaxlm.ops import validation
from jaxlm.ops.dispatch import FormTable, Impl
from jaxlm.ops.gla import chunk_scalar, chunk_vector
from jaxlm.ops.gla.associative import diagonal_associative
from jaxlm.ops.gla.recurrent import diagonal_recurrent
from jaxlm.ops.sequence import repeat_heads
from jaxlm.typing import QK, HeadDecay, ScalarGate, SegmentIds, State, Values, VectorGate, no_type_check

# A denominator floor for the normalised form, so that an all-zero prefix gives 0, not NaN.
NORMALIZER_EPS = 1e-10


# Every form: (c: Canonical, g [B, T, HV] scalar or [B, T, HV, K] vector log gates, float32,
# *, chunk_size) -> (o [B, T, HV, V] float32, final state [B, HV, K, V]).


def _recurrent(c: lr.Canonical, g: ScalarGate | VectorGate, *, chunk_size: int | None) -> tuple[Values, State]:
    return diagonal_recurrent(c.q, c.k, c.v, lr.per_channel_gate(g), c.reset, c.s0)


def _associative(c: lr.Canonical, g: ScalarGate | VectorGate, *, chunk_size: int | None) -> tuple[Values, State]:
    return diagonal_associative(c.q, c.k, c.v, lr.per_channel_gate(g), c.reset, c.s0)


def _chunk(c: lr.Canonical, g: ScalarGate | VectorGate, *, chunk_size: int | None) -> tuple[Values, State]:
    form = chunk_vector if g.ndim == 4 else chunk_scalar
    return lr.run_chunk_form(form.prepare, form.advance, form.readout, (c.q, c.k, c.v, g), c.reset, c.s0, chunk_size)


def _pallas(c: lr.Canonical, g: ScalarGate | VectorGate, *, chunk_size: int | None) -> tuple[Values, State]:
    return lr.run_pallas("gla" if g.ndim == 4 else "simple_gla", c, g, chunk_size)


_FORMS = {"recurrent": _recurrent, "associative": _associative, "chunk": _chunk, "pallas": _pallas}
# The three ops run the same forms (each form picks the scalar or vector math from g's rank);
# a table each, so that a message names the op that was called.
LINEAR_ATTN_FORMS = FormTable("linear_attn", _FORMS, lr.RECURRENCE_DEFAULTS)
SIMPLE_GLA_FORMS = FormTable("simple_gla", _FORMS, lr.RECURRENCE_DEFAULTS)
GLA_FORMS = FormTable("gla", _FORMS, lr.RECURRENCE_DEFAULTS)


@no_type_check
def simple_gla(
    q: QK,
    k: QK,
    v: Values,
    g: ScalarGate | None = None,
    *,
    g_gamma: HeadDecay | None = None,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
    impl: Impl = None,
    chunk_size: int | None = None,
) -> tuple[Values, State | None]:
    """Scalar-gated linear attention: Mamba-2/SSD, RetNet, Lightning attention.

    Args:
      q, k: [B, T, H, K]. v: [B, T, HV, V] with HV a multiple of H (grouped value heads).
      g: [B, T, HV] natural-log decays <= 0, per head and step, or None.
      g_gamma: [HV] constant log decay per head (RetNet, Lightning), or None. With both, the
        decays add; with neither, this is plain causal linear attention.
      scale: multiplies q; default K**-0.5.
      initial_state: [B, HV, K, V], applied to the first segment of each row.
      output_final_state: also return the final state [B, HV, K, V] in float32.
      segment_ids: [B, T] ints of packed documents; the state resets where the id changes.
      impl: a form ("recurrent", "associative", "chunk", "pallas"), a sequence of forms tried in
        order, or None for the platform's default list (see ops.dispatch).
      chunk_size: a positive power of two, the chunk form's and the kernel's tile; None: 64.
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state or None.
    """
    common = dict(scale=scale, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)
    return _scalar_gated(
        SIMPLE_GLA_FORMS, q, k, v, g, g_gamma, initial_state=initial_state, output_final_state=output_final_state,
        **common,
    )


def _scalar_gated(forms: FormTable, q, k, v, g, g_gamma, *, scale, initial_state, output_final_state, segment_ids,
                  impl, chunk_size):
    """simple_gla, run through ``forms`` (simple_gla's or linear_attn's table)."""
    b, t, _, _, hv, _ = lr.check_common(
        q, k, v, forms=forms, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl,
        chunk_size=chunk_size,
    )
    gate = jnp.zeros((b, t, hv), jnp.float32)
    if g is not None:
        validation.check_log_gate("g", g, (b, t, hv), "B,T,HV")
        gate = gate + g.astype(jnp.float32)
    if g_gamma is not None:
        validation.check_log_gate("g_gamma", g_gamma, (hv,), "HV")
        gate = gate + g_gamma.astype(jnp.float32)
    return lr.run_forms(
        forms, impl, q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, output_final_state=output_final_state, log_gate=gate,
    )


@no_type_check
def gla(
    q: QK,
    k: QK,
    v: Values,
    g: VectorGate,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
    impl: Impl = None,
    chunk_size: int | None = None,
) -> tuple[Values, State | None]:
    """Gated linear attention with a per-key-channel gate.

    Args:
      q, k: [B, T, H, K]. v: [B, T, HV, V] with HV a multiple of H.
      g: [B, T, HV, K] natural-log decays <= 0; state row k decays by exp(g[..., k]).
      Other arguments as in ``simple_gla``.
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state [B, HV, K, V] float32 or None.
    """
    b, t, _, dk, hv, _ = lr.check_common(
        q, k, v, forms=GLA_FORMS, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl,
        chunk_size=chunk_size,
    )
    validation.check_log_gate("g", g, (b, t, hv, dk), "B,T,HV,K")
    return lr.run_forms(
        GLA_FORMS, impl, q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, output_final_state=output_final_state, log_gate=g,
    )


@no_type_check
def linear_attn(
    q: QK,
    k: QK,
    v: Values,
    *,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: State | None = None,
    output_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
    impl: Impl = None,
    chunk_size: int | None = None,
) -> tuple[Values, State | None]:
    """Causal linear attention, o_t = Σ_{s<=t} (scale·q_t · k_s) v_s: Q(KᵀV) instead of (QKᵀ)V.

    Args:
      q, k: [B, T, H, K] (apply any feature map first). v: [B, T, HV, V].
      normalize: divide o_t by z_t = scale·q_t · Σ_{s<=t} k_s (same document only). The
        normaliser covers the tokens of this call, not ``initial_state``; it expects positive
        feature maps, as z_t must not change sign.
      Other arguments as in ``simple_gla``.
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state [B, HV, K, V] float32 or None.
    """
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool, got {normalize!r}")
    common = dict(scale=scale, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)
    o, s = _scalar_gated(
        LINEAR_ATTN_FORMS, q, k, v, None, None, initial_state=initial_state, output_final_state=output_final_state,
        **common,
    )
    if not normalize:
        return o, s
    # z_t is linear attention against a value of ones: same forms, same segment handling.
    ones = jnp.ones((*q.shape[:3], 1), jnp.float32)
    z, _ = _scalar_gated(LINEAR_ATTN_FORMS, q, k, ones, None, None, initial_state=None, output_final_state=False,
                         **common)
    z = repeat_heads(z, v.shape[2] // q.shape[2])
    return (o.astype(jnp.float32) / (z + NORMALIZER_EPS)).astype(v.dtype), s
