"""Backward chunk step of the gated delta rule (see forward.py for the chunk equations).

With R = V − γ ⊙ (K S), U = T (β ⊙ R), T = (I + M)^{-1} recomputed from the start state S:
  dU = (Q Kᵀ ⊙ D)ᵀ dO + (K ⊙ δ) dS'
  dR' = Tᵀ dU  (cotangent of β ⊙ R);   dM = −dR' Uᵀ on the strictly lower part
  dV = β ⊙ dR';   dβ = rowsum(dR' ⊙ R) + rowsum(K ⊙ (dM ⊙ D) K)
  dQ = (dO Uᵀ ⊙ D) K + γ ⊙ (dO Sᵀ)
  dK = β ⊙ (dM ⊙ D) K − βγ ⊙ (dR' Sᵀ)                     [k_t as the later token]
     + (β ⊙ (dM ⊙ D))ᵀ K + (dO Uᵀ ⊙ D)ᵀ Q + δ ⊙ (U dS'ᵀ)    [k_s as the earlier token]
  dS = (Q ⊙ γ)ᵀ dO + γ_C dS' − (βγ ⊙ K)ᵀ dR'
  db = rowsum(Q ⊙ dQ) + rowsum(K ⊙ dK_later) − rowsum(K ⊙ dK_earlier) + [t = C−1] Σ(S' ⊙ dS')
(every decay is exp(b_later − b_earlier), so a cumsum enters with + as the later end of a pair
and − as the earlier one).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import tile_math as tm
from kernels_pallas.delta.forward import strictly_lower, unit_lower_inverse
from kernels_pallas.scalar_decays import scalar_decays


def _rowsum(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=1, keepdims=True)


def backward_step(refs: Sequence[Any], do_ref: Any, grad_refs: Sequence[Any], start: Any, s: jax.Array,
                  ds_next: jax.Array, *, chunk: int, precision: Any) -> jax.Array:
    """refs as in forward_step; grad_refs: dq, dk, db, dbeta (partial over value blocks), dv."""
    q_ref, k_ref, b_ref, beta_ref, n_ref, v_ref = refs
    dq_ref, dk_ref, db_ref, dbeta_ref, dv_ref = grad_refs
    rows = pl.ds(start, chunk)
    q, k, beta, v, do = q_ref[rows, :], k_ref[rows, :], beta_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    d = scalar_decays(b_ref[rows, :], n_ref[rows, :])
    lower = strictly_lower(d.pair)
    inverse = unit_lower_inverse(beta * tm.mm_nt(k, k, precision) * lower, precision)
    residual = v - d.query * tm.mm(k, s, precision)
    u = tm.mm(inverse, beta * residual, precision)
    keys_to_end = k * d.key
    s_next = d.chunk * s + tm.mm_tn(keys_to_end, u, precision)

    scores = tm.mm_nt(q, k, precision) * d.pair
    du = tm.mm_tn(scores, do, precision) + tm.mm(keys_to_end, ds_next, precision)
    dr = tm.mm_tn(inverse, du, precision)
    dm = -tm.mm_nt(dr, u, precision) * lower
    dm_k = tm.mm(dm, k, precision)
    d_scores = tm.mm_nt(do, u, precision) * d.pair

    dq = tm.mm(d_scores, k, precision) + d.query * tm.mm_nt(do, s, precision)
    dk_later = beta * dm_k - (beta * d.query) * tm.mm_nt(dr, s, precision)
    dk_earlier = (
        tm.mm_tn(beta * dm, k, precision) + tm.mm_tn(d_scores, q, precision) + d.key * tm.mm_nt(u, ds_next, precision)
    )
    db = _rowsum(q * dq + k * dk_later - k * dk_earlier) + tm.last_row(tm.total(s_next * ds_next), chunk)

    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk_later + dk_earlier
    db_ref[rows, :] = db
    dbeta_ref[rows, :] = _rowsum(dr * residual) + _rowsum(k * dm_k)
    dv_ref[rows, :] = beta * dr
    ds = tm.mm_tn(q * d.query, do, precision) + d.chunk * ds_next
    return ds - tm.mm_tn(beta * d.query * k, dr, precision)
