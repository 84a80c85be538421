"""Softmax attention in plain XLA: the reference form, with materialised scores.

Short sequences compute the whole [T, S] score matrix at once. Long ones walk over blocks of
query rows with ``lax.map``; each block still takes an exact softmax over all S keys (no online
rescaling), so the result matches the one-shot form to rounding. The block body is rematerialised
in the backward pass, so neither pass ever holds more than one block's scores: at T=16384, H=4 the
full score tensor alone would be T²·H·4 bytes = 4.3 GB, a 512-row block is 134 MB.

A prefill piece over a long KV cache (``masked_attention``) also walks over blocks of keys, with
an online softmax (a running maximum and denominator): one 512-token piece against a cache of 1M
slots would otherwise hold 512·1M·H scores, 8 GB at H=4, where the cache itself holds 1M·H·D.
A one-token decode step does not: its S·H scores are smaller than the cache it reads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlm.typing import (
    QK,
    AttnKeys,
    AttnOut,
    AttnValues,
    Documents,
    HeadMajorKeys,
    HeadMajorValues,
    KeyDocuments,
    KeyPositions,
    QueryPositions,
    SegmentIds,
)

# Query rows per block once T exceeds it. 512 rows keeps a block's scores at 512·S·H floats.
QUERY_BLOCK = 512
# Cache slots per block once a cached attention of more than one query reads more than this. A
# 512-token piece over 64K slots on the 2-core CPU (H=4, D=32): one shot 3.3 s and 1 GiB of
# temporaries; blocks of 1024, 512, 256: 1.7, 1.4, 1.4 s and 25, 13, 6 MiB.
KEY_BLOCK = 512

_HIGHEST = jax.lax.Precision.HIGHEST


def attention_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
    *,
    causal: bool,
    window: int | None,
) -> jax.Array:
    """Which keys each query may read.

    q_pos: [Tq] and k_pos: [S] int positions; q_seg: [B, Tq] and k_seg: [B, S] document ids or None.
    Returns a bool mask broadcastable to [B, 1, 1, Tq, S] (batch, kv head, group, query, key).
    """
    diff = q_pos[:, None] - k_pos[None, :]  # t - s
    mask = jnp.ones(diff.shape, bool)
    if causal:
        mask = diff >= 0
        if window is not None:
            mask = mask & (diff < window)
    elif window is not None:
        mask = jnp.abs(diff) < window
    mask = mask[None]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask[:, None, None]


def _masked_scores(q, k, mask, scale):
    """q [B, Tq, Hk, G, D], k [B, Hk, S, D] float32, mask [B|1, 1, 1, Tq, S] -> scaled scores
    [B, Hk, G, Tq, S], masked ones at float32's finite floor."""
    qt = jnp.transpose(q, (0, 2, 3, 1, 4))  # [B, Hk, G, Tq, D]
    s = jax.lax.dot_general(k, qt, (((3,), (4,)), ((0, 1), (0, 1))), precision=_HIGHEST)  # [B, Hk, S, G, Tq]
    s = jnp.transpose(s, (0, 1, 3, 4, 2)) * scale  # [B, Hk, G, Tq, S]
    # Masked scores become a finite floor rather than -inf, and their probabilities are zeroed
    # with where after exp: no inf - inf or 0 * inf can reach a value or a gradient, even for a
    # query that sees no key at all.
    return jnp.where(mask, s, jnp.finfo(jnp.float32).min)


def _weigh_values(p, v):
    """p [B, Hk, G, Tq, S] weights, v [B, Hk, S, Dv] -> [B, Hk, G, Tq, Dv]."""
    return jax.lax.dot_general(p, v, (((4,), (2,)), ((0, 1), (0, 1))), precision=_HIGHEST)


def masked_softmax_attend(q, k, v, mask, scale):
    """q: [B, Tq, Hk, G, D]; k: [B, Hk, S, D]; v: [B, Hk, S, Dv] float32; mask [B|1, 1, 1, Tq, S].

    Returns [B, Tq, Hk, G, Dv] float32.

    k and v are head-major, the layout of the KV cache, and both products are written as the
    batched matmuls XLA runs without moving an operand: batch (B, Hk) leading, then
    [S, D] @ [D, G·Tq] for the scores and [G·Tq, S] @ [S, Dv] for the output. A decode step then
    reads the cache where it lies; only q, the scores and the output change layout, and none of
    them is bigger than the scores. (As einsums, "bqhgd,bhsd->bhgqs" and "bhgqs,bhsv->bqhgv";
    jnp.einsum orders the operands its own way and XLA then copies a transposed cache.)
    """
    s = _masked_scores(q, k, mask, scale)
    # The softmax does not depend on the shift, so it needs no gradient.
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # A query with no visible key gets a zero output instead of 0/0.
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.transpose(_weigh_values(p, v), (0, 3, 1, 2, 4))


def attend_by_key_blocks(q, k, v, k_pos, k_doc, mask_fn, scale, block: int):
    """Masked softmax attention over key blocks of ``block`` slots, with an online softmax.

    q: [B, Tq, Hk, G, D]; k: [B, Hk, S, D] and v: [B, Hk, S, Dv] float32; k_pos: [S] key
    positions (negative: an empty slot); k_doc: [B, S]. mask_fn(k_pos [Sb], k_doc [B, Sb]) gives
    a block's mask [B|1, 1, 1, Tq, Sb]. A loop over the blocks keeps each query's running maximum
    score, denominator and weighted sum, so no step holds more than one block's scores; each
    block is sliced from the cache in place (the S mod block slots left over are one last
    block). Returns [B, Tq, Hk, G, Dv] float32.
    """
    b, hk, s_len, _ = k.shape
    tq, groups, dv = q.shape[1], q.shape[3], v.shape[3]

    def update(carry, start, size: int):
        m, denom, acc = carry
        k_blk, v_blk = (jax.lax.dynamic_slice_in_dim(x, start, size, axis=2) for x in (k, v))
        mask = mask_fn(jax.lax.dynamic_slice_in_dim(k_pos, start, size),
                       jax.lax.dynamic_slice_in_dim(k_doc, start, size, axis=1))
        s = _masked_scores(q, k_blk, mask, scale)
        m_new = jnp.maximum(m, jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
        rescale = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        return (m_new, rescale * denom + jnp.sum(p, axis=-1, keepdims=True),
                rescale * acc + _weigh_values(p, v_blk))

    floor = jnp.full((b, hk, groups, tq, 1), jnp.finfo(jnp.float32).min)
    carry = (floor, jnp.zeros((b, hk, groups, tq, 1)), jnp.zeros((b, hk, groups, tq, dv)))
    n_blocks, rest = divmod(s_len, block)
    carry = jax.lax.fori_loop(0, n_blocks, lambda i, c: update(c, i * block, block), carry)
    if rest:
        carry = update(carry, n_blocks * block, rest)
    _, denom, acc = carry
    # A query with no visible key gets a zero output instead of 0/0.
    o = acc / jnp.where(denom > 0, denom, 1.0)
    return jnp.transpose(o, (0, 3, 1, 2, 4))


def attend_by_query_blocks(qg, q_pos, q_doc, attend, block: int):
    """Masked softmax attention over query blocks of at most ``block`` rows.

    qg: [B, T, Hk, G, D] float32; q_pos: [T] query positions; q_doc: [B, T] query documents or
    None. attend(q block [B, Tb, Hk, G, D], q_pos [Tb], q_doc [B, Tb] or None) attends one block
    over every key, giving [B, Tb, Hk, G, Dv]. Up to ``block`` rows run at once; longer inputs
    are cut into equal blocks under ``lax.map``, each rematerialised in the backward pass, so no
    pass holds more than one block's scores. Padding rows (document -2, which no key has) are cut
    off. Returns [B, T, Hk, G, Dv] float32.
    """
    b, t, hk, groups, d = qg.shape
    if t <= block:
        return attend(qg, q_pos, q_doc)
    n_blocks = math.ceil(t / block)
    rows = math.ceil(t / n_blocks)
    pad = n_blocks * rows - t
    q_blocks = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    q_blocks = jnp.moveaxis(q_blocks.reshape(b, n_blocks, rows, hk, groups, d), 1, 0)
    pos_blocks = jnp.pad(q_pos, (0, pad)).reshape(n_blocks, rows)
    doc_blocks = None
    if q_doc is not None:
        doc_blocks = jnp.pad(q_doc, ((0, 0), (0, pad)), constant_values=-2)
        doc_blocks = jnp.moveaxis(doc_blocks.reshape(b, n_blocks, rows), 1, 0)

    @jax.checkpoint
    def one_block(xs):
        return attend(*xs)

    o = jax.lax.map(one_block, (q_blocks, pos_blocks, doc_blocks))  # [N, B, rows, Hk, G, Dv]
    return jnp.moveaxis(o, 0, 1).reshape(b, n_blocks * rows, hk, groups, -1)[:, :t]


def attention_xla(
    q: QK,
    k: AttnKeys,
    v: AttnValues,
    *,
    causal: bool,
    scale: float,
    window: int | None,
    segment_ids: SegmentIds | None,
    block_size: int | None = None,
) -> AttnOut:
    """Exact softmax attention on validated inputs.

    q: [B, T, H, D]; k: [B, S, Hk, D]; v: [B, S, Hk, Dv] with H a multiple of Hk; segment_ids
    [B, T] (S == T) or None. block_size: query rows per block once T exceeds it (default
    ``QUERY_BLOCK``, read at call time). Returns [B, T, H, Dv] in v's dtype.
    """
    block = QUERY_BLOCK if block_size is None else block_size
    return _attention_xla(q, k, v, segment_ids, causal=causal, scale=scale, window=window, block=block)


# Jitted as a whole: run eagerly, each of the small ops would be dispatched (and compiled) alone.
@functools.partial(jax.jit, static_argnames=("causal", "scale", "window", "block"))
def _attention_xla(q, k, v, segment_ids, *, causal, scale, window, block):
    b, t, h, d = q.shape
    s_len, hk = k.shape[1], k.shape[2]
    groups = h // hk
    # Query head j reads kv head j // groups: split H as (Hk, G) instead of repeating k and v.
    qg = q.astype(jnp.float32).reshape(b, t, hk, groups, d)
    # Head-major keys and values for masked_softmax_attend: one transpose per call, O(S) work
    # beside the O(T·S) scores, shared by every query block.
    kf = jnp.swapaxes(k, 1, 2).astype(jnp.float32)
    vf = jnp.swapaxes(v, 1, 2).astype(jnp.float32)
    k_pos = jnp.arange(s_len)

    def mask_fn(pos, seg):
        return attention_mask(pos, k_pos, seg, segment_ids, causal=causal, window=window)

    def attend(q_blk, pos, seg):
        return masked_softmax_attend(q_blk, kf, vf, mask_fn(pos, seg), scale)

    o = attend_by_query_blocks(qg, jnp.arange(t), segment_ids, attend, block)
    return o.reshape(b, t, h, -1).astype(v.dtype)


def masked_attention(
    q: QK,
    k: HeadMajorKeys,
    v: HeadMajorValues,
    q_pos: QueryPositions,
    q_doc: Documents,
    k_pos: KeyPositions,
    k_doc: KeyDocuments,
    *,
    scale: float,
    window: int | None,
    block_size: int | None = None,
    key_block_size: int | None = None,
) -> AttnOut:
    """Softmax attention where query t reads key s iff they share a document, s's position is at
    most t's, and (with a window) t − s < window: the XLA form of ``ops.cached_attention``.

    q: [B, T, H, K]; k: [B, Hk, S, K] and v: [B, Hk, S, V], head-major like the KV cache; q_pos:
    [T] and k_pos: [S] int positions (a negative key position marks an empty slot); q_doc: [B, T]
    and k_doc: [B, S] int document numbers. block_size: queries per block once T exceeds it
    (default ``QUERY_BLOCK``: a long prefill holds one block's scores). key_block_size: with
    T > 1, keys per block once S exceeds it, under an online softmax (default ``KEY_BLOCK``: a
    prefill piece over a long cache holds one block's scores).
    Returns [B, T, H, V] in v's dtype; float32 softmax with masks applied by ``where``.
    """
    b, t, h, dk = q.shape
    hk, s_len, dv = k.shape[1], k.shape[2], v.shape[3]
    qg = q.astype(jnp.float32).reshape(b, t, hk, h // hk, dk)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

    def mask_of(qpos_b, qdoc_b, kpos, kdoc):  # [Tb], [B, Tb], [Sb], [B, Sb] -> [B, 1, 1, Tb, Sb]
        diff = qpos_b[:, None] - kpos[None, :]  # [Tb, Sb]
        visible = (diff >= 0) & (kpos >= 0)[None, :]
        if window is not None:
            visible = visible & (diff < window)
        return ((qdoc_b[:, :, None] == kdoc[:, None, :]) & visible[None])[:, None, None]

    rows = QUERY_BLOCK if block_size is None else block_size
    cols = KEY_BLOCK if key_block_size is None else key_block_size

    def attend(q_blk, pos, doc):
        if t > 1 and s_len > cols:
            return attend_by_key_blocks(q_blk, kf, vf, k_pos, k_doc,
                                        lambda kpos, kdoc: mask_of(pos, doc, kpos, kdoc), scale, cols)
        return masked_softmax_attend(q_blk, kf, vf, mask_of(pos, doc, k_pos, k_doc), scale)

    o = attend_by_query_blocks(qg, q_pos, q_doc, attend, rows)
    return o.reshape(b, t, h, dv).astype(v.dtype)
