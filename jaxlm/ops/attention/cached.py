"""Softmax attention over a KV cache: the decode and prefill op of attention layers.

``cached_attention`` writes T ≥ 1 new keys and values into a cache of fixed slots and attends the
T new queries over what the cache then holds. Document numbers and positions kept with the cache
decide which slots a query may read, so batched prompts of different lengths, left-padded with
the padding as its own document, never read padding. A sliding-window layer keeps ``window``
slots, a ring buffer. The attention itself is a form of ``CACHED_ATTENTION_FORMS``, chosen by
``impl`` like every op's (ops.dispatch), so that a decode kernel can take its place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.ops import nonfinite, validation
from jaxlm.ops.attention.api import check_attention_qkv, check_window, poison_heads
from jaxlm.ops.attention.xla import masked_attention
from jaxlm.ops.dispatch import FormTable, Impl
from jaxlm.ops.sequence import segment_starts
from jaxlm.typing import (
    QK,
    AttnOut,
    CacheKeys,
    CacheValues,
    HeadPositions,
    NewKeys,
    NewValues,
    Position,
    RowDocuments,
    SegmentIds,
    SlotDocuments,
    no_type_check,
)


class KVCache(NamedTuple):
    """The cache of a softmax-attention layer.

    L slots hold keys and values. Token position p lives in slot p mod L, so with L = max_len
    this is a plain KV cache, and a sliding-window layer keeps L = window slots as a ring buffer.
    Document numbers keep a decode step from reading padding or another document. Non-finite keys
    and values are stored as zeros; ``last_bad`` remembers where the last one was, so that the
    queries that would read it still come out NaN (ops.nonfinite).

    Keys and values are stored head-major, [B, Hk, L, ·], the layout the attention contractions
    batch over (``masked_softmax_attend``): a decode step reads each cached key and value once, in
    place. Token-major [B, L, Hk, ·] storage made XLA transpose a copy of the whole cache on every
    step, about 3× the memory traffic.
    """

    k: CacheKeys  # [B, Hk, L, K], RoPE already applied
    v: CacheValues  # [B, Hk, L, V]
    key_doc: SlotDocuments  # [B, L] int32 document number of each slot's key; -1 while empty
    doc: RowDocuments  # [B] int32 document number of the row's last token
    pos: Position  # [] int32 tokens written so far: the position of the next token
    last_bad: HeadPositions  # [B, Hk] int32 position of the last non-finite key or value in the row's last document, −1 if none

    @classmethod
    def empty(cls, batch_size: int, n_kv_heads: int, slots: int, k_dim: int, v_dim: int, dtype: Any) -> "KVCache":
        """A cache of ``slots`` empty slots: k [B, Hk, L, K] and v [B, Hk, L, V] in ``dtype``."""
        return cls(
            k=jnp.zeros((batch_size, n_kv_heads, slots, k_dim), dtype),
            v=jnp.zeros((batch_size, n_kv_heads, slots, v_dim), dtype),
            key_doc=jnp.full((batch_size, slots), -1, jnp.int32),
            doc=jnp.zeros((batch_size,), jnp.int32),
            pos=jnp.zeros((), jnp.int32),
            last_bad=jnp.full((batch_size, n_kv_heads), -1, jnp.int32),
        )


# Every form: (q [B, T, H, K], keys [B, Hk, S, K], values [B, Hk, S, V], q_pos [T], q_doc [B, T],
# k_pos [S], k_doc [B, S], *, scale, window) -> o [B, T, H, V] in the values' dtype; query t reads
# key s iff same document, 0 <= k_pos[s] <= q_pos[t] and (with a window) q_pos[t] − k_pos[s] < window.
CACHED_ATTENTION_FORMS = FormTable(
    "cached_attention",
    {"xla": masked_attention},
    {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
)


def slot_positions(pos: jax.Array, slots: int) -> jax.Array:
    """[L] the position held by each slot of a cache that has seen ``pos`` tokens: the latest
    p < pos with p mod L == slot, negative for a slot never written."""
    slot = jnp.arange(slots, dtype=jnp.int32)
    return pos - 1 - jnp.mod(pos - 1 - slot, slots)


def write_slot(buf: jax.Array, new: jax.Array, slot: jax.Array) -> jax.Array:
    """buf [B, Hk, L, ·] with new [B, Hk, 1, ·] written at slot (an int32 scalar), in place.

    The write covers two slots, the new one and a neighbour that gets its own value back, rather
    than one. XLA:CPU treats a dynamic_update_slice whose update has fewer non-unit dims than the
    cache as free to duplicate: when B or Hk is 1, the attention matmul reads the cache through a
    reshape that drops that dim, the update is fused into it a second time, and XLA copies the
    whole cache to keep both copies in place (four full-cache copies per array and step, measured
    in the HLO). A two-slot update is not duplicated, so the step reads the cache where it lies.
    """
    slots = buf.shape[2]
    if slots == 1:
        return jax.lax.dynamic_update_slice_in_dim(buf, new, slot, axis=2)
    start = jnp.minimum(slot, slots - 2)
    pair = jax.lax.dynamic_slice_in_dim(buf, start, 2, axis=2)
    is_new = (start + jnp.arange(2, dtype=start.dtype) == slot)[:, None]  # [2, 1]
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(is_new, new, pair), start, axis=2)


def new_token_documents(cache: Any, segment_ids: SegmentIds | None, b: int, t: int) -> tuple[jax.Array, ...]:
    """(starts [B, T] bool, q_doc [B, T] int32, q_pos [T] int32) of a call's T new tokens: where a
    document starts, each token's document number and its position. ``cache`` has ``doc`` [B] and
    ``pos`` []; the call's first document continues the cache's last one."""
    starts = segment_starts(segment_ids, b, t)
    q_doc = cache.doc[:, None] + jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    q_pos = cache.pos + jnp.arange(t, dtype=jnp.int32)
    return starts, q_doc, q_pos


def write_tokens(
    buffers: tuple[jax.Array, ...], new: tuple[jax.Array, ...], key_doc: jax.Array, q_doc: jax.Array, q_pos: jax.Array
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Writes T new tokens at slots q_pos mod L: each of ``new`` [B, Hk, T, ·] into its buffer
    [B, Hk, L, ·], and q_doc [B, T] into key_doc [B, L]. Returns (buffers, key_doc)."""
    t, slots = q_pos.shape[0], key_doc.shape[1]
    # Only the last `slots` new tokens can stay; their slots are distinct, so the scatter is exact.
    n = min(t, slots)
    write = jnp.mod(q_pos[t - n :], slots)
    if t == 1:
        # A decode step writes one slot, in place in the donated cache.
        written = tuple(write_slot(buf, x, write[0]) for buf, x in zip(buffers, new))
        return written, jax.lax.dynamic_update_slice_in_dim(key_doc, q_doc, write[0], axis=1)
    written = tuple(buf.at[:, :, write].set(x[:, :, t - n :]) for buf, x in zip(buffers, new))
    return written, key_doc.at[:, write].set(q_doc[:, t - n :])


def _check_args(q: Any, k: Any, v: Any, cache: KVCache, segment_ids: Any, scale: Any, window: Any) -> None:
    b, t, _, dk, s, hk, dv = check_attention_qkv(q, k, v)
    if s != t:
        raise ValueError(f"k and v must hold the same T={t} new tokens as q, got S={s}")
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
    slots = np.shape(cache.k)[2] if np.ndim(cache.k) == 4 else None
    if np.shape(cache.k) != (b, hk, slots, dk) or np.shape(cache.v) != (b, hk, slots, dv):
        raise ValueError(
            f"cache.k must have shape [B={b}, Hk={hk}, L, K={dk}] and cache.v [B={b}, Hk={hk}, L, V={dv}] to match "
            f"k and v, got {np.shape(cache.k)} and {np.shape(cache.v)}"
        )
    validation.check_segment_ids(segment_ids, b, t)
    validation.check_scale(scale)
    check_window(window)


@no_type_check
def cached_attention(
    q: QK,
    k: NewKeys,
    v: NewValues,
    cache: KVCache,
    *,
    scale: float | None = None,
    window: int | None = None,
    segment_ids: SegmentIds | None = None,
    impl: Impl = None,
) -> tuple[AttnOut, KVCache]:
    """Writes T new keys and values into the cache and attends the T new queries over it.

    Args:
      q: [B, T, H, K]; k: [B, T, Hk, K]; v: [B, T, Hk, V], RoPE already applied at positions
        cache.pos + [0, T); H a multiple of Hk.
      cache: the KVCache of L slots; past L tokens the oldest slots are overwritten.
      scale: multiplies the scores; default K**-0.5.
      window: None, or a causal sliding window t − window < s <= t (the cache then needs only
        ``window`` slots).
      segment_ids: [B, T] ints or None; the call's first document continues the cache's last one.
      impl: a form of CACHED_ATTENTION_FORMS ("xla"), a sequence of them, or None.
    Returns:
      o [B, T, H, V] in v's dtype, and the updated cache.
    """
    CACHED_ATTENTION_FORMS.candidates(impl)
    _check_args(q, k, v, cache, segment_ids, scale, window)
    b, t = q.shape[:2]
    out_dtype = v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    slots = cache.k.shape[2]
    starts, q_doc, q_pos = new_token_documents(cache, segment_ids, b, t)
    # Non-finite values are stored as zeros and put back where they reach (ops.nonfinite).
    (q, bad_queries), (k, bad_k), (v, bad_v) = (nonfinite.isolate(x, 3) for x in (q, k, v))
    last_bad = nonfinite.last_bad_position(bad_k | bad_v, q_pos, starts, cache.last_bad)  # [B, T, Hk]
    # The cache is head-major, [B, Hk, L, ·]: turn the T new tokens round, not the L cached ones.
    k = jnp.swapaxes(k, 1, 2).astype(cache.k.dtype)
    v = jnp.swapaxes(v, 1, 2).astype(cache.v.dtype)

    (new_k, new_v), new_key_doc = write_tokens((cache.k, cache.v), (k, v), cache.key_doc, q_doc, q_pos)
    new_cache = KVCache(
        k=new_k, v=new_v, key_doc=new_key_doc, doc=q_doc[:, -1], pos=cache.pos + t, last_bad=last_bad[:, -1]
    )

    if window is None or t == 1:
        # Writing first loses nothing a query needs: a full cache overwrites no live slot, and a
        # one-token step in a ring of `window` slots overwrites a position `window` behind it.
        keys, values, k_doc = new_cache.k, new_cache.v, new_cache.key_doc
        k_pos = slot_positions(new_cache.pos, slots)
    else:
        # A window prefill could overwrite keys its own earlier queries need: read the old ring
        # and the new tokens side by side instead.
        keys = jnp.concatenate([cache.k, k], axis=2)
        values = jnp.concatenate([cache.v, v], axis=2)
        k_doc = jnp.concatenate([cache.key_doc, q_doc], axis=1)
        k_pos = jnp.concatenate([slot_positions(cache.pos, slots), q_pos])
    o = CACHED_ATTENTION_FORMS.run(impl, q, keys, values, q_pos, q_doc, k_pos, k_doc, scale=scale, window=window)
    reached = last_bad >= 0
    if window is not None:
        reached = reached & (q_pos[None, :, None] - last_bad < window)
    return poison_heads(o.astype(out_dtype), bad_queries, reached), new_cache
