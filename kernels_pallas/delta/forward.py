"""Forward chunk step of the gated delta rule: S <- exp(g_t) S; S <- S + k_t (β_t (v_t − Sᵀk_t))ᵀ;
o_t = Sᵀ q_t. The delta rule is the same with g = 0.

Per chunk with start state S, decays as in the scalar-gate kernel (D pairwise, γ from the chunk
start, δ to the chunk end), the values the tokens write, U, solve the unit lower-triangular
system of the UT/WY transform:
  (I + M) U = β ⊙ (V − γ ⊙ (K S)),     M[t, s] = β_t (k_t · k_s) D[t, s]  for s < t
  o  = γ ⊙ (Q S) + (Q Kᵀ ⊙ D) U
  S' = γ_C S + (K ⊙ δ)ᵀ U
Pallas has no triangular solve on TPU, so (I + M)^{-1} is built in-kernel from matmuls.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import tile_math as tm
from kernels_pallas.scalar_decays import scalar_decays


BLOCK = 16  # diagonal block of the triangular inverse


def strictly_lower(x: jax.Array) -> jax.Array:
    return jnp.where(tm.row_ids(x.shape) > tm.col_ids(x.shape), x, 0.0)


def unit_lower_inverse(m: jax.Array, precision: Any) -> jax.Array:
    """(I + M)^{-1} for M [C, C] strictly lower triangular, C a power of two >= 16.

    The diagonal BLOCK×BLOCK blocks by forward substitution, all blocks at once (step t solves
    row t of every block from its rows < t). Then, with Y = (I + M_diag)^{-1} and
    N = Y M_off strictly block-lower (so N^{C/BLOCK} = 0), (I + M)^{-1} = (I + N)^{-1} Y, with
    (I + N)^{-1} = I − N(I − N(I − …)) in C/BLOCK − 1 matmuls: block forward substitution.
    """
    c = m.shape[0]
    block = min(BLOCK, c)
    rows, cols = tm.row_ids((c, c)), tm.col_ids((c, c))
    eye = jnp.where(rows == cols, 1.0, 0.0)
    shift = block.bit_length() - 1
    same_block = lax.shift_right_logical(rows, shift) == lax.shift_right_logical(cols, shift)
    m_diag = jnp.where(same_block, m, 0.0)
    row_in_block = jnp.bitwise_and(rows, block - 1)

    def substitute(t, y):
        return jnp.where(row_in_block == t, eye - tm.mm(m_diag, y, precision), y)

    y = lax.fori_loop(0, block, substitute, jnp.zeros((c, c), tm.F32))
    if c == block:
        return y
    n_off = tm.mm(y, m - m_diag, precision)
    z = eye
    for _ in range(c // block - 1):
        z = eye - tm.mm(n_off, z, precision)
    return tm.mm(z, y, precision)


def forward_step(
    refs: Sequence[Any], start: Any, s: jax.Array, o_ref: Any, *, chunk: int, precision: Any
) -> jax.Array:
    """refs: q, k [T, K]; b, beta, n [T, 1] (gate cumsum, write strength, reset count);
    v [T, BV]. s: [K, BV]."""
    q_ref, k_ref, b_ref, beta_ref, n_ref, v_ref = refs
    rows = pl.ds(start, chunk)
    k, beta, v = k_ref[rows, :], beta_ref[rows, :], v_ref[rows, :]
    d = scalar_decays(b_ref[rows, :], n_ref[rows, :])
    inverse = unit_lower_inverse(beta * tm.mm_nt(k, k, precision) * strictly_lower(d.pair), precision)
    u = tm.mm(inverse, beta * (v - d.query * tm.mm(k, s, precision)), precision)
    if o_ref is not None:
        q = q_ref[rows, :]
        scores = tm.mm_nt(q, k, precision) * d.pair
        o_ref[rows, :] = d.query * tm.mm(q, s, precision) + tm.mm(scores, u, precision)
    return d.chunk * s + tm.mm_tn(k * d.key, u, precision)
