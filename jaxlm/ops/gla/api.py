"""Public ops for diagonal-gate recurrences: linear attention, simple GLA and GLA.

All three are S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ with o_t = S_tᵀ (scale·q_t): no gate,
one log decay per head and step, and one per key channel. Shapes follow docs/architecture.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops import linear_recurrence as lr
from jaxlm.ops import validation
from jaxlm.ops.gla import chunk_scalar, chunk_vector
from jaxlm.ops.gla.associative import diagonal_associative
from jaxlm.ops.gla.recurrent import diagonal_recurrent
from jaxlm.ops.sequence import repeat_heads

_TOKEN_FORMS = {"recurrent": diagonal_recurrent, "associative": diagonal_associative}

# A denominator floor for the normalised form, so that an all-zero prefix gives 0, not NaN.
NORMALIZER_EPS = 1e-10


def _run(op, c: lr.Canonical, gate, vector_gate: bool, impl, chunk_size):
    """gate: [B, T, HV] (scalar) or [B, T, HV, K] (vector), float32."""
    impl = lr.resolve_impl(impl, op)
    if impl == "pallas":
        return lr.run_pallas("gla" if vector_gate else "simple_gla", c, gate, chunk_size)
    if impl == "chunk":
        form = chunk_vector if vector_gate else chunk_scalar
        return lr.run_chunk_form(
            form.prepare, form.advance, form.readout, (c.q, c.k, c.v, gate), c.reset, c.s0, chunk_size
        )
    token_gate = gate if vector_gate else gate[..., None]
    return _TOKEN_FORMS[impl](c.q, c.k, c.v, token_gate, c.reset, c.s0)


def simple_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    *,
    g_gamma: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: str | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array | None]:
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
      impl: "recurrent", "associative", "chunk", "pallas" or None (fastest available).
      chunk_size: a positive power of two, for the chunk form.
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state or None.
    """
    b, t, _, _, hv, _ = lr.check_common(
        q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size
    )
    gate = jnp.zeros((b, t, hv), jnp.float32)
    if g is not None:
        validation.check_log_gate("g", g, (b, t, hv), "B,T,HV")
        gate = gate + g.astype(jnp.float32)
    if g_gamma is not None:
        validation.check_log_gate("g_gamma", g_gamma, (hv,), "HV")
        gate = gate + g_gamma.astype(jnp.float32)
    c = lr.canonicalize(q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    o, s = _run("simple_gla", c, gate, False, impl, chunk_size)
    return lr.finish(o, s, v.dtype, output_final_state)


def gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: str | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated linear attention with a per-key-channel gate.

    Args:
      q, k: [B, T, H, K]. v: [B, T, HV, V] with HV a multiple of H.
      g: [B, T, HV, K] natural-log decays <= 0; state row k decays by exp(g[..., k]).
      Other arguments as in ``simple_gla``.
    Returns:
      o [B, T, HV, V] in v's dtype, and the final state [B, HV, K, V] float32 or None.
    """
    b, t, _, dk, hv, _ = lr.check_common(
        q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size
    )
    validation.check_log_gate("g", g, (b, t, hv, dk), "B,T,HV,K")
    c = lr.canonicalize(q, k, v, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    o, s = _run("gla", c, g.astype(jnp.float32), True, impl, chunk_size)
    return lr.finish(o, s, v.dtype, output_final_state)


def linear_attn(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    impl: str | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array | None]:
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
    o, s = simple_gla(q, k, v, initial_state=initial_state, output_final_state=output_final_state, **common)
    if not normalize:
        return o, s
    # z_t is linear attention against a value of ones: same forms, same segment handling.
    ones = jnp.ones((*q.shape[:3], 1), jnp.float32)
    z, _ = simple_gla(q, k, ones, **common)
    z = repeat_heads(z, v.shape[2] // q.shape[2])
    return (o.astype(jnp.float32) / (z + NORMALIZER_EPS)).astype(v.dtype), s
