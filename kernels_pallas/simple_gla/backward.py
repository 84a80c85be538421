"""Backward chunk step of the scalar-gate recurrence (see forward.py for the chunk equations).

Given the chunk's start state S and the cotangents dO and dS' of its output and end state:
  dV  = (Q Kᵀ ⊙ D)ᵀ dO + (K ⊙ δ) dS'
  dQ  = (dO Vᵀ ⊙ D) K + γ ⊙ (dO Sᵀ)
  dK  = (dO Vᵀ ⊙ D)ᵀ Q + δ ⊙ (V dS'ᵀ)
  dS  = (Q ⊙ γ)ᵀ dO + γ_C dS'
  db  = rowsum(Q ⊙ dQ) − rowsum(K ⊙ dK) + [t = C−1] Σ(S' ⊙ dS')
The db line holds because every decay is exp(b_later − b_earlier): a token's cumsum enters with
a plus sign where it is the later end (its query, the chunk end) and a minus sign where it is
the earlier one (its key), and the chunk end's terms add up to S' itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import tile_math as tm
from kernels_pallas.scalar_decays import scalar_decays


def backward_step(refs: Sequence[Any], do_ref: Any, grad_refs: Sequence[Any], start: Any, s: jax.Array,
                  ds_next: jax.Array, *, chunk: int, precision: Any) -> jax.Array:
    """refs as in forward_step; grad_refs: dq, dk, db (partial over value blocks), dv."""
    q_ref, k_ref, b_ref, n_ref, v_ref = refs
    dq_ref, dk_ref, db_ref, dv_ref = grad_refs
    rows = pl.ds(start, chunk)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    d = scalar_decays(b_ref[rows, :], n_ref[rows, :])
    keys_to_end = k * d.key
    s_next = d.chunk * s + tm.mm_tn(keys_to_end, v, precision)

    scores = tm.mm_nt(q, k, precision) * d.pair
    d_scores = tm.mm_nt(do, v, precision) * d.pair
    dq = tm.mm(d_scores, k, precision) + d.query * tm.mm_nt(do, s, precision)
    dk = tm.mm_tn(d_scores, q, precision) + d.key * tm.mm_nt(v, ds_next, precision)
    db = jnp.sum(q * dq - k * dk, axis=1, keepdims=True) + tm.last_row(tm.total(s_next * ds_next), chunk)

    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk
    db_ref[rows, :] = db
    dv_ref[rows, :] = tm.mm_tn(scores, do, precision) + tm.mm(keys_to_end, ds_next, precision)
    return tm.mm_tn(q * d.query, do, precision) + d.chunk * ds_next
