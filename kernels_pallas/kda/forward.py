"""Forward chunk step of Kimi Delta Attention (KDA), the gated delta rule with a per-key-channel
gate: S <- Diag(exp(g_t)) S; S <- S + k_t (β_t (v_t − Sᵀk_t))ᵀ; o_t = Sᵀ q_t.

Per chunk with start state S, per-channel decays as in the GLA kernel (decay_c(t <- s) =
exp(b_tc − b_sc), zero across a reset in that channel; γ from the chunk start, δ to the chunk
end, γ_C over the whole chunk), the values the tokens write, U, solve the unit lower-triangular
system of the UT/WY transform, as in the delta kernel:
  (I + β ⊙ A) U = β ⊙ (V − (K ⊙ γ) S),   A[t, s] = Σ_c k_tc k_sc decay_c(t <- s)  for s < t
  o  = (Q ⊙ γ) S + P U,                   P[t, s] = Σ_c q_tc k_sc decay_c(t <- s)  for s <= t
  S' = γ_C ⊙ S + (K ⊙ δ)ᵀ U
A and P do not factor into one matmul without dividing by decays that over- or underflow
(exp(b_t) · exp(−b_s) overflows long before the product does), so both are built with the GLA
kernel's secondary chunking (``gated_scores``), and (I + β ⊙ A)^{-1} with the delta kernel's
blocked in-kernel inverse.
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


def placement(chunk: int, m: Any) -> jax.Array:
    """[C, SUB] 0/1 matrix E with E[r, j] = [r = m·SUB + j]: ``E @ x`` puts a sub-block's rows x
    [SUB, D] at rows m·SUB.. of a [C, D] value, ``Eᵀ @ y`` takes them out of y [C, D] (exact
    matmuls instead of dynamic slices of values)."""
    shape = (chunk, SUB)
    return jnp.where(tm.row_ids(shape) == m * SUB + tm.col_ids(shape), 1.0, 0.0)


class SubBlock:
    """The factors of sub-block m of a chunk (rows m·SUB.., all read from refs), against the
    chunk's tokens before it, factored through r, the sub-block's first row:
      decay_c(t <- s) = decay_c(t <- r) · decay_c(r <- s)  for s < r <= t, both factors <= 1.
    """

    def __init__(self, k_ref: Any, b_ref: Any, n_ref: Any, start: Any, m: Any, k: jax.Array, b: jax.Array,
                 n: jax.Array, chunk: int):
        """k, b, n: the whole chunk's [C, K] rows of the refs."""
        self.rows = pl.ds(pl.multiple_of(start + m * SUB, SUB), SUB)
        self.k, self.b, self.n = k_ref[self.rows, :], b_ref[self.rows, :], n_ref[self.rows, :]
        self.place = placement(chunk, m)
        b_r, n_r = tm.take_row(self.b, 0), tm.take_row(self.n, 0)
        self.from_first = tm.masked_exp(self.b - b_r, self.n == n_r)  # [SUB, K] decay(t <- r)
        earlier = jnp.logical_and(tm.row_ids((chunk, 1)) < m * SUB, n == n_r)
        self.to_first = tm.masked_exp(b_r - b, earlier)  # [C, K] decay(r <- s), zero for s >= r
        self.keys_to_first = k * self.to_first


def gated_scores(x_refs: Sequence[Any], k_ref: Any, b_ref: Any, n_ref: Any, start: Any, chunk: int,
                 precision: Any) -> tuple[jax.Array, ...]:
    """M[t, s] = Σ_c x_tc k_sc decay_c(t <- s) for s <= t (zero above the diagonal), [C, C], for
    each row-side input x in ``x_refs`` (q for P, k for A), over chunk rows [start, start + C).

    Sub-block m, rows m·SUB..: the diagonal [SUB, SUB] block elementwise (``gla.diag_block``),
    the tokens before it as one matmul of (x ⊙ decay(t <- r)) and (k ⊙ decay(r <- s)).
    """
    whole = pl.ds(start, chunk)
    k, b, n = k_ref[whole, :], b_ref[whole, :], n_ref[whole, :]

    def sub_block(m, acc):
        sb = SubBlock(k_ref, b_ref, n_ref, start, m, k, b, n, chunk)
        out = []
        for x_ref, scores in zip(x_refs, acc):
            x_m = x_ref[sb.rows, :]
            diag = diag_block(x_m, sb.k, sb.b, sb.n)
            rows_m = tm.mm_nt(diag, sb.place, precision) + tm.mm_nt(x_m * sb.from_first, sb.keys_to_first, precision)
            out.append(scores + tm.mm(sb.place, rows_m, precision))
        return tuple(out)

    zeros = tuple(jnp.zeros((chunk, chunk), tm.F32) for _ in x_refs)
    return lax.fori_loop(0, chunk // SUB, sub_block, zeros)


def forward_step(
    refs: Sequence[Any], start: Any, s: jax.Array, o_ref: Any, *, chunk: int, precision: Any
) -> jax.Array:
    """refs: q, k, b, n [T, K] (per-channel gate cumsum and reset count); beta [T, 1];
    v [T, BV]. s: [K, BV]."""
    q_ref, k_ref, b_ref, beta_ref, n_ref, v_ref = refs
    whole = pl.ds(start, chunk)
    k, b, n, beta, v = k_ref[whole, :], b_ref[whole, :], n_ref[whole, :], beta_ref[whole, :], v_ref[whole, :]
    from_start = tm.masked_exp(b, n == 0.0)  # [C, K] γ
    x_refs = (k_ref,) if o_ref is None else (k_ref, q_ref)
    key_scores, *query_scores = gated_scores(x_refs, k_ref, b_ref, n_ref, start, chunk, precision)
    inverse = unit_lower_inverse(beta * strictly_lower(key_scores), precision)
    u = tm.mm(inverse, beta * (v - tm.mm(k * from_start, s, precision)), precision)
    if o_ref is not None:
        q = q_ref[whole, :]
        o_ref[whole, :] = tm.mm(q * from_start, s, precision) + tm.mm(query_scores[0], u, precision)
    to_end, chunk_decay = end_decays(b, n)
    return chunk_decay * s + tm.mm_tn(k * to_end, u, precision)
