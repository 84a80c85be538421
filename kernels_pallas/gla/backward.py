"""Backward chunk step of the vector-gate recurrence (see forward.py), one sub-block at a time.

For sub-block m, in float32:
  - as queries: dq_m from the diagonal block, from earlier keys through m's first row (as in the
    forward), and from the start state, γ ⊙ (dO Sᵀ);
  - as keys: dk_m and dv_m from the diagonal block, from later queries through m's last row
    ((q_t ⊙ decay(t <- e)) · (k_s ⊙ decay(e <- s)), both factors <= 1), and from the end state;
  - db_m = q ⊙ dq − k ⊙ dk, plus rowsum(S' ⊙ dS') on the chunk's last token: each decay is
    exp(b_later − b_earlier), so a cumsum enters with + as the later end and − as the earlier.
The start-state cotangent is (Q ⊙ γ)ᵀ dO + γ_C ⊙ dS'.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import tile_math as tm
from kernels_pallas.gla.forward import SUB, diag_block, end_decays


def backward_step(refs: Sequence[Any], do_ref: Any, grad_refs: Sequence[Any], start: Any, s: jax.Array,
                  ds_next: jax.Array, *, chunk: int, precision: Any) -> jax.Array:
    """refs as in forward_step; grad_refs: dq, dk, db (partial over value blocks), dv."""
    q_ref, k_ref, b_ref, n_ref, v_ref = refs
    dq_ref, dk_ref, db_ref, dv_ref = grad_refs
    whole = pl.ds(start, chunk)
    q, k, b, n = q_ref[whole, :], k_ref[whole, :], b_ref[whole, :], n_ref[whole, :]
    v, do = v_ref[whole, :], do_ref[whole, :]
    key_decay, chunk_decay = end_decays(b, n)
    b_end, n_end = tm.take_row(b, chunk - 1), tm.take_row(n, chunk - 1)
    s_next = chunk_decay * s + tm.mm_tn(k * key_decay, v, precision)
    end_term = tm.col_to_row(jnp.sum(s_next * ds_next, axis=1, keepdims=True))  # [1, K]
    local = tm.row_ids((chunk, 1))
    n_sub = chunk // SUB
    last_token = tm.row_ids((SUB, 1)) == SUB - 1

    def sub_block(m, ds):
        rows = pl.ds(pl.multiple_of(start + m * SUB, SUB), SUB)
        q_m, k_m, b_m, n_m, v_m, do_m = (r[rows, :] for r in (q_ref, k_ref, b_ref, n_ref, v_ref, do_ref))
        scores_mm, dq_m, dk_m = diag_block(q_m, k_m, b_m, n_m, tm.mm_nt(do_m, v_m, precision))

        b_r, n_r = tm.take_row(b_m, 0), tm.take_row(n_m, 0)
        k_f = k * tm.masked_exp(b_r - b, jnp.logical_and(local < m * SUB, n == n_r))
        dq_m += tm.masked_exp(b_m - b_r, n_m == n_r) * tm.mm(tm.mm_nt(do_m, v, precision), k_f, precision)

        b_e, n_e = tm.take_row(b_m, SUB - 1), tm.take_row(n_m, SUB - 1)
        k_to_e = tm.masked_exp(b_e - b_m, n_m == n_e)
        q_f = q * tm.masked_exp(b - b_e, jnp.logical_and(local >= (m + 1) * SUB, n == n_e))
        dk_m += k_to_e * tm.mm_tn(tm.mm_nt(do, v_m, precision), q_f, precision)
        dv_m = tm.mm_tn(tm.mm_nt(q_f, k_m * k_to_e, precision), do, precision)
        dv_m += tm.mm_tn(scores_mm, do_m, precision)

        q_start = tm.masked_exp(b_m, n_m == 0.0)
        k_end = tm.masked_exp(b_end - b_m, n_m == n_end)
        dq_m += q_start * tm.mm_nt(do_m, s, precision)
        dk_m += k_end * tm.mm_nt(v_m, ds_next, precision)
        dv_m += tm.mm(k_m * k_end, ds_next, precision)
        end = jnp.logical_and(last_token, m == n_sub - 1)

        dq_ref[rows, :] = dq_m
        dk_ref[rows, :] = dk_m
        db_ref[rows, :] = q_m * dq_m - k_m * dk_m + jnp.where(end, end_term, 0.0)
        dv_ref[rows, :] = dv_m
        return ds + tm.mm_tn(q_m * q_start, do_m, precision)

    return lax.fori_loop(0, n_sub, sub_block, chunk_decay * ds_next)

