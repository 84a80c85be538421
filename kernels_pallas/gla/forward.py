"""Forward chunk step of the vector-gate recurrence (GLA): S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ.

The intra-chunk score A[t, s] = Σ_k q_tk k_sk decay_k(t <- s) does not factor into one matmul
without dividing by decays that underflow, so the chunk is split into sub-blocks of ``SUB``
tokens (secondary chunking):
  - query sub-block m against the keys before it factors through r, the first row of m:
    (q_t ⊙ decay(t <- r)) · (k_s ⊙ decay(r <- s)), both factors <= 1, one matmul;
  - the diagonal sub-block builds each score column from the [SUB, K] decays directly, in float32.
Decays are exp(b_later − b_earlier) on chunk-local cumsums b, zero across a reset (where the
per-channel reset counts n differ); the masks are applied before and after exp.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import tile_math as tm


SUB = 16  # secondary chunk (sub-block) length


def diag_block(q: jax.Array, k: jax.Array, b: jax.Array, n: jax.Array, d_scores: jax.Array | None = None):
    """Scores of one sub-block against itself, and optionally their input cotangents.

    q, k, b, n: [L, K] (b cumsums, n reset counts); d_scores: [L, L] cotangent of the scores.
    Returns scores [L, L] (zero above the diagonal), and with d_scores also dq, dk [L, K].
    One key column s at a time: decay(t <- s) for every t is an [L, K] array (elementwise work,
    no matmul).
    """
    size = q.shape[0]
    rows, cols, key_rows = tm.row_ids((size, 1)), tm.col_ids((size, size)), tm.row_ids(q.shape)

    def column(s, carry):
        scores, dq, dk = carry
        k_s, b_s, n_s = tm.take_row(k, s), tm.take_row(b, s), tm.take_row(n, s)
        decay = tm.masked_exp(b - b_s, jnp.logical_and(rows >= s, n == n_s))  # [L, K]
        scores = jnp.where(cols == s, jnp.sum(q * (k_s * decay), axis=1, keepdims=True), scores)
        if d_scores is not None:
            d_col = tm.take_col(d_scores, s)  # [L, 1]
            dq = dq + d_col * (k_s * decay)
            dk = jnp.where(key_rows == s, jnp.sum(d_col * q * decay, axis=0, keepdims=True), dk)
        return scores, dq, dk

    zeros = jnp.zeros(q.shape, tm.F32)
    scores, dq, dk = lax.fori_loop(0, size, column, (jnp.zeros((size, size), tm.F32), zeros, zeros))
    return scores if d_scores is None else (scores, dq, dk)


def end_decays(b: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """decay(chunk end <- s) [C, K] and decay(chunk end <- start) as a column [K, 1]."""
    c = b.shape[0]
    b_end, n_end = tm.take_row(b, c - 1), tm.take_row(n, c - 1)
    key = tm.masked_exp(b_end - b, n == n_end)
    return key, tm.row_to_col(tm.masked_exp(b_end, n_end == 0.0))


def forward_step(
    refs: Sequence[Any], start: Any, s: jax.Array, o_ref: Any, *, chunk: int, precision: Any
) -> jax.Array:
    """refs: q, k, b, n [T, K]; v [T, BV]. s: [K, BV]."""
    q_ref, k_ref, b_ref, n_ref, v_ref = refs
    whole = pl.ds(start, chunk)
    k, b, n, v = k_ref[whole, :], b_ref[whole, :], n_ref[whole, :], v_ref[whole, :]
    local = tm.row_ids((chunk, 1))

    def sub_block(m, carry):
        rows = pl.ds(pl.multiple_of(start + m * SUB, SUB), SUB)
        q_m, k_m, b_m, n_m, v_m = (r[rows, :] for r in (q_ref, k_ref, b_ref, n_ref, v_ref))
        o_m = tm.mm(diag_block(q_m, k_m, b_m, n_m), v_m, precision)
        o_m += tm.mm(q_m * tm.masked_exp(b_m, n_m == 0.0), s, precision)
        b_r, n_r = tm.take_row(b_m, 0), tm.take_row(n_m, 0)
        q_f = q_m * tm.masked_exp(b_m - b_r, n_m == n_r)
        k_f = k * tm.masked_exp(b_r - b, jnp.logical_and(local < m * SUB, n == n_r))
        o_ref[rows, :] = o_m + tm.mm(tm.mm_nt(q_f, k_f, precision), v, precision)
        return carry

    if o_ref is not None:
        lax.fori_loop(0, chunk // SUB, sub_block, None)
    key_decay, chunk_decay = end_decays(b, n)
    return chunk_decay * s + tm.mm_tn(k * key_decay, v, precision)
