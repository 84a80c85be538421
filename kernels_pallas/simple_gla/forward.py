"""Forward chunk step of the scalar-gate recurrence S_t = exp(g_t) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t.

Per chunk of C tokens with start state S (one value block):
  o  = (Q Kᵀ ⊙ D) V + γ ⊙ (Q S)        D[t, s] = decay(t <- s), γ_t = decay(t <- start)
  S' = γ_C S + (K ⊙ δ)ᵀ V               δ_s = decay(chunk end <- s)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.experimental import pallas as pl

from kernels_pallas import tile_math as tm
from kernels_pallas.scalar_decays import scalar_decays


def forward_step(
    refs: Sequence[Any], start: Any, s: jax.Array, o_ref: Any, *, chunk: int, precision: Any
) -> jax.Array:
    """refs: q, k [T, K]; b, n [T, 1] (gate cumsum, reset count); v [T, BV]. s: [K, BV]."""
    q_ref, k_ref, b_ref, n_ref, v_ref = refs
    rows = pl.ds(start, chunk)
    k, v = k_ref[rows, :], v_ref[rows, :]
    d = scalar_decays(b_ref[rows, :], n_ref[rows, :])
    if o_ref is not None:
        q = q_ref[rows, :]
        scores = tm.mm_nt(q, k, precision) * d.pair
        o_ref[rows, :] = tm.mm(scores, v, precision) + d.query * tm.mm(q, s, precision)
    return d.chunk * s + tm.mm_tn(k * d.key, v, precision)
