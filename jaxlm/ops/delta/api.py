"""Public ops for the delta rules: DeltaNet, Gated DeltaNet and Kimi Delta Attention (KDA).

Per step t: S <- diag(exp(g_t)) S (one decay per head, or per key channel for KDA), then
S <- S + k_t (β_t (v_t − Sᵀ k_t))ᵀ, then o_t = Sᵀ (scale·q_t): the state is corrected towards v_t
along k_t rather than only added to. The op does not normalise k; the layer L2-normalises keys,
which with β in (0, 1) keeps the update contractive.
Shapes follow the "Ops API" section of the design document.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlm.ops import linear_recurrence as lr
from jaxlm.ops import validation
from jaxlm.ops.delta import chunk
from jaxlm.ops.delta.associative import delta_associative
from jaxlm.ops.delta.recurrent import delta_recurrent
from jaxlm.ops.dispatch import FormTable, Impl
from jaxlm.ops.sequence import default_chunk_size
from jaxlm.typing import QK, Beta, ScalarGate, SegmentIds, State, Values, VectorGate, no_type_check

# Every form: (c: Canonical, g [B, T, HV] or [B, T, HV, K] log gates, beta [B, T, HV], float32,
# *, chunk_size) -> (o [B, T, HV, V] float32, final state [B, HV, K, V]).


def _recurrent(
    c: lr.Canonical, g: ScalarGate | VectorGate, beta: Beta, *, chunk_size: int | None
) -> tuple[Values, State]:
    return delta_recurrent(c.q, c.k, c.v, lr.per_channel_gate(g), beta, c.reset, c.s0)


def _associative(
    c: lr.Canonical, g: ScalarGate | VectorGate, beta: Beta, *, chunk_size: int | None
) -> tuple[Values, State]:
    return delta_associative(c.q, c.k, c.v, lr.per_channel_gate(g), beta, c.reset, c.s0)


def _chunk(
    c: lr.Canonical, g: ScalarGate | VectorGate, beta: Beta, *, chunk_size: int | None
) -> tuple[Values, State]:
    per_token = (c.q, c.k, c.v, lr.per_channel_gate(g), beta)
    size = default_chunk_size(chunk_size, kda_chunk_form=g.ndim == 4)
    return lr.run_chunk_form(chunk.prepare, chunk.advance, chunk.readout, per_token, c.reset, c.s0, size)


def _pallas(
    c: lr.Canonical, g: ScalarGate | VectorGate, beta: Beta, *, chunk_size: int | None
) -> tuple[Values, State]:
    return lr.run_pallas("delta" if g.ndim == 3 else "kda", c, g, chunk_size, beta)


# The three ops run the same forms (each picks the per-head or per-channel math from g's rank);
# a table each, so that a message names the op that was called.
_FORMS = {"recurrent": _recurrent, "associative": _associative, "chunk": _chunk, "pallas": _pallas}
GATED_DELTA_RULE_FORMS = FormTable("gated_delta_rule", _FORMS, lr.RECURRENCE_DEFAULTS)
DELTA_RULE_FORMS = FormTable("delta_rule", _FORMS, lr.RECURRENCE_DEFAULTS)
KDA_FORMS = FormTable("kda", _FORMS, lr.RECURRENCE_DEFAULTS)


@no_type_check
def gated_delta_rule(
    q: QK,
    k: QK,
    v: Values,
    g: ScalarGate,
    beta: Beta,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
    impl: Impl = None,
    chunk_size: int | None = None,
) -> tuple[Values, State | None]:
    """Gated delta rule (Gated DeltaNet, Qwen3-Next's linear layers).

    Args:
      q, k: [B, T, H, K]. v: [B, T, HV, V] with HV a multiple of H (grouped value heads).
      g: [B, T, HV] natural-log decays <= 0, per head and step.
      beta: [B, T, HV] write strengths, usually in (0, 1).
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
    b, t, _, _, hv, _ = lr.check_common(
        q, k, v, forms=GATED_DELTA_RULE_FORMS, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        impl=impl, chunk_size=chunk_size,
    )
    validation.check_log_gate("g", g, (b, t, hv), "B,T,HV")
    validation.check_beta(beta, (b, t, hv))
    return lr.run_forms(
        GATED_DELTA_RULE_FORMS, impl, q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, output_final_state=output_final_state, log_gate=g, beta=beta,
    )


@no_type_check
def delta_rule(
    q: QK,
    k: QK,
    v: Values,
    beta: Beta,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
    impl: Impl = None,
    chunk_size: int | None = None,
) -> tuple[Values, State | None]:
    """Delta rule (DeltaNet): the gated delta rule with no decay, g = 0.

    Args:
      q, k: [B, T, H, K]. v: [B, T, HV, V] with HV a multiple of H.
      beta: [B, T, HV] write strengths, usually in (0, 1).
      Other arguments as in ``gated_delta_rule``.
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state [B, HV, K, V] float32 or None.
    """
    b, t, _, _, hv, _ = lr.check_common(
        q, k, v, forms=DELTA_RULE_FORMS, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl,
        chunk_size=chunk_size,
    )
    validation.check_beta(beta, (b, t, hv))
    return lr.run_forms(
        DELTA_RULE_FORMS, impl, q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, output_final_state=output_final_state, log_gate=jnp.zeros((b, t, hv), jnp.float32),
        beta=beta,
    )


@no_type_check
def kda(
    q: QK,
    k: QK,
    v: Values,
    g: VectorGate,
    beta: Beta,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
    impl: Impl = None,
    chunk_size: int | None = None,
) -> tuple[Values, State | None]:
    """Kimi Delta Attention: the gated delta rule with a decay per key channel (Kimi Linear).

    Per step t: S <- diag(exp(g_t)) S; S <- S + k_t (β_t (v_t − Sᵀk_t))ᵀ; o_t = Sᵀ(scale·q_t).

    Args:
      q, k: [B, T, H, K]. v: [B, T, HV, V] with HV a multiple of H (grouped value heads).
      g: [B, T, HV, K] natural-log decays <= 0; state row k decays by exp(g[..., k]). A gate at
        or below −30 (and −inf) clears its row exactly.
      beta: [B, T, HV] write strengths, usually in (0, 1).
      chunk_size: as in ``gated_delta_rule``, except that None runs the chunk form on CPU at 16,
        its fastest tile there (ops.sequence.default_chunk_size).
      Other arguments as in ``gated_delta_rule``.
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state [B, HV, K, V] float32 or None.
    """
    b, t, _, dk, hv, _ = lr.check_common(
        q, k, v, forms=KDA_FORMS, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl,
        chunk_size=chunk_size,
    )
    validation.check_log_gate("g", g, (b, t, hv, dk), "B,T,HV,K")
    validation.check_beta(beta, (b, t, hv))
    return lr.run_forms(
        KDA_FORMS, impl, q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
        chunk_size=chunk_size, output_final_state=output_final_state, log_gate=g, beta=beta,
    )
