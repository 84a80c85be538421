"""Backward chunk step of Kimi Delta Attention (see forward.py for the chunk equations).

With W = K ⊙ γ, R = V − W S, U = T (β ⊙ R), T = (I + β ⊙ A)^{-1}, all recomputed from the
start state S:
  dU  = Pᵀ dO + (K ⊙ δ) dS'
  dR' = Tᵀ dU  (cotangent of β ⊙ R);   dA' = −dR' Uᵀ on the strictly lower part (of β ⊙ A)
  dV  = β ⊙ dR';   dβ = rowsum(dR' ⊙ R) + rowsum(dA' ⊙ A)
  dP  = dO Uᵀ;     dA = β ⊙ dA'   (their q, k and b cotangents: ``gated_scores_vjp``)
  dQ  = [P: q side] + γ ⊙ (dO Sᵀ)
  dK  = [A: k_t side] − γ ⊙ (dV Sᵀ)                       [k_t as the later token]
      + [P: k side] + [A: k_s side] + δ ⊙ (U dS'ᵀ)        [k_s as the earlier token]
  dS  = (Q ⊙ γ)ᵀ dO + γ_C ⊙ dS' − Wᵀ dV
  db  = Q ⊙ dQ + K ⊙ dK_later − K ⊙ dK_earlier + [t = C−1] rowsum(S' ⊙ dS')
(every decay is exp(b_later − b_earlier) per channel, so a cumsum enters with + as the later end
of a pair and − as the earlier one).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import tile_math as tm
from kernels_pallas.delta.forward import strictly_lower, unit_lower_inverse
from kernels_pallas.gla.forward import SUB, diag_block, end_decays
from kernels_pallas.kda.forward import SubBlock, gated_scores


def _rowsum(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=1, keepdims=True)


def gated_scores_vjp(x_refs: Sequence[Any], d_scores: Sequence[jax.Array], k_ref: Any, b_ref: Any, n_ref: Any,
                     start: Any, chunk: int, precision: Any) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Cotangents of ``forward.gated_scores``: given dM [C, C] for each row-side x, returns
    (dx [C, K] for each x, and dk [C, K] summed over them). Entries of dM above the diagonal are
    ignored. The same sub-blocks as the forward: the diagonal block elementwise
    (``gla.diag_block`` with its cotangents), the tokens before it through the first row."""
    whole = pl.ds(start, chunk)
    k, b, n = k_ref[whole, :], b_ref[whole, :], n_ref[whole, :]

    def sub_block(m, carry):
        dxs, dk = carry
        sb = SubBlock(k_ref, b_ref, n_ref, start, m, k, b, n, chunk)
        out = []
        for x_ref, d, dx in zip(x_refs, d_scores, dxs):
            x_m = x_ref[sb.rows, :]
            d_rows = tm.mm_tn(sb.place, d, precision)  # [SUB, C]: rows m·SUB.. of dM
            _, dx_m, dk_m = diag_block(x_m, sb.k, sb.b, sb.n, tm.mm(d_rows, sb.place, precision))
            dx_m += sb.from_first * tm.mm(d_rows, sb.keys_to_first, precision)
            out.append(dx + tm.mm(sb.place, dx_m, precision))
            dk += tm.mm(sb.place, dk_m, precision)
            dk += sb.to_first * tm.mm_tn(d_rows, x_m * sb.from_first, precision)
        return tuple(out), dk

    zeros = jnp.zeros((chunk, k.shape[1]), tm.F32)
    return lax.fori_loop(0, chunk // SUB, sub_block, (tuple(zeros for _ in x_refs), zeros))


def backward_step(refs: Sequence[Any], do_ref: Any, grad_refs: Sequence[Any], start: Any, s: jax.Array,
                  ds_next: jax.Array, *, chunk: int, precision: Any) -> jax.Array:
    """refs as in forward_step; grad_refs: dq, dk, db, dbeta (partial over value blocks), dv."""
    q_ref, k_ref, b_ref, beta_ref, n_ref, v_ref = refs
    dq_ref, dk_ref, db_ref, dbeta_ref, dv_ref = grad_refs
    rows = pl.ds(start, chunk)
    q, k, b, n = q_ref[rows, :], k_ref[rows, :], b_ref[rows, :], n_ref[rows, :]
    beta, v, do = beta_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    from_start = tm.masked_exp(b, n == 0.0)
    to_end, chunk_decay = end_decays(b, n)
    key_scores, query_scores = gated_scores((k_ref, q_ref), k_ref, b_ref, n_ref, start, chunk, precision)
    key_scores = strictly_lower(key_scores)
    inverse = unit_lower_inverse(beta * key_scores, precision)
    w = k * from_start
    residual = v - tm.mm(w, s, precision)
    u = tm.mm(inverse, beta * residual, precision)
    keys_to_end = k * to_end
    s_next = chunk_decay * s + tm.mm_tn(keys_to_end, u, precision)

    du = tm.mm_tn(query_scores, do, precision) + tm.mm(keys_to_end, ds_next, precision)
    dr = tm.mm_tn(inverse, du, precision)
    da = -strictly_lower(tm.mm_nt(dr, u, precision))
    dv = beta * dr
    (dq, dk_later), dk_earlier = gated_scores_vjp(
        (q_ref, k_ref), (tm.mm_nt(do, u, precision), beta * da), k_ref, b_ref, n_ref, start, chunk, precision
    )
    dq += from_start * tm.mm_nt(do, s, precision)
    dk_later -= from_start * tm.mm_nt(dv, s, precision)
    dk_earlier += to_end * tm.mm_nt(u, ds_next, precision)
    end_term = tm.col_to_row(_rowsum(s_next * ds_next))  # [1, K]
    db = q * dq + k * dk_later - k * dk_earlier + tm.last_row(end_term, chunk)

    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk_later + dk_earlier
    db_ref[rows, :] = db
    dbeta_ref[rows, :] = _rowsum(dr * residual) + _rowsum(da * key_scores)
    dv_ref[rows, :] = dv
    return tm.mm_tn(q * from_start, do, precision) + chunk_decay * ds_next - tm.mm_tn(w, dv, precision)
