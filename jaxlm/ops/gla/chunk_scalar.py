"""Chunk form of the scalar-gate recurrence (linear attention, simple GLA, Mamba-2/SSD).

Per chunk of C tokens with start state S:
  o   = (Q Kᵀ ⊙ D) V + diag(γ) Q S        D[t, s] = decay(t <- s) for s <= t, γ_t = decay(t <- start)
  S'  = γ_C S + Σ_s decay(C <- s) k_s v_sᵀ
The intra-chunk part is quadratic in C; only S crosses chunk boundaries. These three functions
plug into ``jaxlm.ops.chunked.run_chunked``. ``prepare`` keeps only the chunk's state transition
(N·K·V in all), and ``readout`` does the quadratic part, so no T-sized intermediate outlives its
chunk group.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlm.ops.gate_cumsum import chunk_cumsums, masked_decay
from jaxlm.typing import ChunkValues, State

HIGHEST = "highest"


def _cumsums(x):
    _, _, _, g, reset = x
    return chunk_cumsums(g, reset[:, :, None] > 0)  # [B, C, H] each


def prepare(x):
    """x = (q, k, v, g, reset): q, k [B, C, H, K]; v [B, C, H, V]; g [B, C, H]; reset [B, C].

    Returns the chunk's state transition: decay [B, H] and update [B, H, K, V].
    """
    _, k, v, _, _ = x
    b, count = _cumsums(x)
    key_decay = masked_decay(b[:, -1:], b, count == count[:, -1:])
    chunk_decay = masked_decay(b[:, -1], 0.0, count[:, -1] == 0)
    update = jnp.einsum("bshk,bsh,bshv->bhkv", k, key_decay, v, precision=HIGHEST)
    return chunk_decay, update


def advance(aux: tuple, s: State) -> State:
    chunk_decay, update = aux
    return chunk_decay[:, :, None, None] * s + update


def readout(x: tuple, aux: tuple, s: State) -> ChunkValues:
    q, k, v, _, _ = x
    c = q.shape[1]
    b, count = _cumsums(x)
    causal = jnp.tril(jnp.ones((c, c), bool))[None, :, :, None]
    same = jnp.logical_and(causal, count[:, :, None] == count[:, None, :])
    decay = masked_decay(b[:, :, None], b[:, None, :], same)  # [B, t, s, H]
    scores = jnp.einsum("bthk,bshk->btsh", q, k, precision=HIGHEST) * decay
    intra = jnp.einsum("btsh,bshv->bthv", scores, v, precision=HIGHEST)
    query_decay = masked_decay(b, 0.0, count == 0)
    inter = jnp.einsum("bthk,bhkv->bthv", q, s, precision=HIGHEST)
    return intra + query_decay[..., None] * inter
