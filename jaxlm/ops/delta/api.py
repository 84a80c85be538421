"""Public ops for the delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet).

Per step t: S <- exp(g_t) S, then S <- S + k_t (β_t (v_t − Sᵀ k_t))ᵀ, then o_t = Sᵀ (scale·q_t):
the state is corrected towards v_t along k_t rather than only added to. The op does not
normalise k; the layer L2-normalises keys, which with β in (0, 1) keeps the update contractive.
Shapes follow the "Ops API" section of the design document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops import linear_recurrence as lr
from jaxlm.ops import validation
from jaxlm.ops.delta import chunk
from jaxlm.ops.delta.associative import delta_associative
from jaxlm.ops.delta.recurrent import delta_recurrent

_TOKEN_FORMS = {"recurrent": delta_recurrent, "associative": delta_associative}


def _run(op: str, c: lr.Canonical, g: jax.Array, beta: jax.Array, impl, chunk_size: int):
    """g, beta: [B, T, HV] float32."""
    impl = lr.resolve_impl(impl, op)
    if impl == "pallas":
        return lr.run_pallas("delta", c, g, chunk_size, beta)
    if impl == "chunk":
        return lr.run_chunk_form(
            chunk.prepare, chunk.advance, chunk.readout, (c.q, c.k, c.v, g, beta), c.reset, c.s0, chunk_size
        )
    return _TOKEN_FORMS[impl](c.q, c.k, c.v, g, beta, c.reset, c.s0)


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: str | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated delta rule (Gated DeltaNet, Qwen3-Next's linear layers).

    Args:
      q, k: [B, T, H, K]. v: [B, T, HV, V] with HV a multiple of H (grouped value heads).
      g: [B, T, HV] natural-log decays <= 0, per head and step.
      beta: [B, T, HV] write strengths, usually in (0, 1).
      scale: multiplies q; default K**-0.5.
      initial_state: [B, HV, K, V], applied to the first segment of each row.
      output_final_state: also return the final state [B, HV, K, V] in float32.
      segment_ids: [B, T] ints of packed documents; the state resets where the id changes.
      impl: "recurrent", "associative", "chunk", "pallas" or None (fastest available).
      chunk_size: a positive power of two, for the chunk form.
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state or None.
    """
    b, t, _, _, hv, _ = lr.check_common(
        q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size
    )
    validation.check_log_gate("g", g, (b, t, hv), "B,T,HV")
    validation.check_beta(beta, (b, t, hv))
    c = lr.canonicalize(q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    o, s = _run("gated_delta_rule", c, g.astype(jnp.float32), beta.astype(jnp.float32), impl, chunk_size)
    return lr.finish(o, s, v.dtype, output_final_state)


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: str | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array | None]:
    """Delta rule (DeltaNet): the gated delta rule with no decay, g = 0.

    Args:
      q, k: [B, T, H, K]. v: [B, T, HV, V] with HV a multiple of H.
      beta: [B, T, HV] write strengths, usually in (0, 1).
      Other arguments as in ``gated_delta_rule``.
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state [B, HV, K, V] float32 or None.
    """
    b, t, _, _, hv, _ = lr.check_common(
        q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size
    )
    validation.check_beta(beta, (b, t, hv))
    c = lr.canonicalize(q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    g = jnp.zeros((b, t, hv), jnp.float32)
    o, s = _run("delta_rule", c, g, beta.astype(jnp.float32), impl, chunk_size)
    return lr.finish(o, s, v.dtype, output_final_state)
