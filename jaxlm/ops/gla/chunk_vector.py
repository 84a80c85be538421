"""Chunk form of the vector-gate recurrence (GLA), with secondary chunking.

With a per-channel gate the intra-chunk score is A[t, s] = Σ_k q_tk k_sk decay_k(t <- s), which
does not factor into one matmul without dividing by decays that can underflow. The chunk is
split into sub-chunks of ``SUB_CHUNK`` tokens:
  - a query sub-chunk i and an earlier key sub-chunk j factor through the boundary r_i just
    before sub-chunk i: (q_t ⊙ decay(t <- r_i)) · (k_s ⊙ decay(r_i <- s)), both factors <= 1;
  - the diagonal sub-chunks form the [sub, sub, K] decay tensor directly, in float32.
The state pass between chunks is as in the scalar form, with a K-vector decay; as there,
``prepare`` keeps only the state transition and ``readout`` does the quadratic work.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlm.ops.gate_cumsum import chunk_cumsums, masked_decay
from jaxlm.typing import ChunkValues, State

HIGHEST = "highest"
SUB_CHUNK = 16


def _blocks(x, n):
    """[B, C, ...] -> [B, n, C/n, ...]."""
    return x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:])


def _cumsums(x):
    _, _, _, g, reset = x
    return chunk_cumsums(g, reset[:, :, None, None] > 0)  # [B, C, H, K] each


def prepare(x):
    """x = (q, k, v, g, reset): q, k, g [B, C, H, K]; v [B, C, H, V]; reset [B, C].

    Returns the chunk's state transition: decay [B, H, K] and update [B, H, K, V].
    """
    _, k, v, _, _ = x
    b, count = _cumsums(x)
    key_decay = masked_decay(b[:, -1:], b, count == count[:, -1:])
    chunk_decay = masked_decay(b[:, -1], 0.0, count[:, -1] == 0)
    update = jnp.einsum("bshk,bshv->bhkv", k * key_decay, v, precision=HIGHEST)
    return chunk_decay, update


def advance(aux: tuple, s: State) -> State:
    chunk_decay, update = aux
    return chunk_decay[..., None] * s + update


def _intra(q, k, v, b, count):
    """The intra-chunk output Σ_{s<=t} (Σ_k q_tk k_sk decay_k(t <- s)) v_s, [B, C, H, V]."""
    batch, c = q.shape[:2]
    sub = min(SUB_CHUNK, c)
    n = c // sub

    # Diagonal sub-chunks: the decay tensor itself.
    qb, kb, vb, bb, cb = (_blocks(a, n) for a in (q, k, v, b, count))
    causal = jnp.tril(jnp.ones((sub, sub), bool))[None, None, :, :, None, None]
    same = jnp.logical_and(causal, cb[:, :, :, None] == cb[:, :, None, :])
    decay = masked_decay(bb[:, :, :, None], bb[:, :, None, :], same)  # [B, n, t, s, H, K]
    scores = jnp.einsum("bithk,bishk,bitshk->bitsh", qb, kb, decay, precision=HIGHEST)
    intra = jnp.einsum("bitsh,bishv->bithv", scores, vb, precision=HIGHEST)

    # Earlier sub-chunks, through the boundary r_i = i*sub - 1 (sub-chunk 0 has none).
    ref = jnp.maximum(jnp.arange(n) * sub - 1, 0)
    b_ref, count_ref = b[:, ref], count[:, ref]  # [B, n, H, K]
    q_keep = cb == count_ref[:, :, None]
    q_factor = qb * masked_decay(bb, b_ref[:, :, None], q_keep)  # [B, n, sub, H, K]
    earlier = (jnp.arange(c)[None, :] < (jnp.arange(n) * sub)[:, None])[None, :, :, None, None]
    k_keep = jnp.logical_and(earlier, count_ref[:, :, None] == count[:, None])
    k_factor = k[:, None] * masked_decay(b_ref[:, :, None], b[:, None], k_keep)  # [B, n, C, H, K]
    cross = jnp.einsum("bithk,bishk->bitsh", q_factor, k_factor, precision=HIGHEST)
    intra = intra + jnp.einsum("bitsh,bshv->bithv", cross, v, precision=HIGHEST)
    return intra.reshape(batch, c, *intra.shape[3:])


def readout(x: tuple, aux: tuple, s: State) -> ChunkValues:
    q, k, v, _, _ = x
    b, count = _cumsums(x)
    query_decay = masked_decay(b, 0.0, count == 0)
    inter = jnp.einsum("bthk,bhkv->bthv", q * query_decay, s, precision=HIGHEST)
    return _intra(q, k, v, b, count) + inter
