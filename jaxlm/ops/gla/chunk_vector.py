"""Chunk form of the vector-gate recurrence (GLA).

With a per-channel gate the intra-chunk score Σ_k q_tk k_sk decay_k(t <- s) does not factor
into one matmul; ops.channel_scores forms it by secondary chunking. The state pass between
chunks is as in the scalar form, with a K-vector decay; as there, ``prepare`` keeps only the
state transition and ``readout`` does the quadratic work.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlm.ops.channel_scores import blocks, channel_score_blocks
from jaxlm.ops.gate_cumsum import chunk_cumsums, masked_decay
from jaxlm.typing import ChunkValues, State

HIGHEST = "highest"


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


def readout(x: tuple, aux: tuple, s: State) -> ChunkValues:
    q, k, v, _, _ = x
    b, count = _cumsums(x)
    query_decay = masked_decay(b, 0.0, count == 0)
    inter = jnp.einsum("bthk,bhkv->bthv", q * query_decay, s, precision=HIGHEST)
    # By sub-chunk, each block of scores straight into its values: no C×C matrix is assembled.
    diagonal, cross = channel_score_blocks(q, k, b, count, strict=False)
    n = diagonal.shape[1]
    intra = jnp.einsum("bitsh,bishv->bithv", diagonal, blocks(v, n), precision=HIGHEST)
    if cross is not None:
        intra = intra + jnp.einsum("bitsh,bshv->bithv", cross, v, precision=HIGHEST)
    return intra.reshape(inter.shape) + inter
