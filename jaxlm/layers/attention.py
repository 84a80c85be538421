"""Softmax attention: RoPE, GQA, optional QK RMSNorm, sigmoid output gate and sliding window.

Without a cache the full sequence runs through ``ops.attention``. With a ``KVCache`` the new keys
and values are written into the cache and the queries attend over the cached ones
(``cached_attention``): document numbers and positions kept with the cache decide which slots a
query may read, so batched prompts of different lengths, left-padded with the padding as its own
segment, never read padding. A sliding-window layer keeps only ``window`` slots, a ring buffer.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops
from jaxlm.layers.cache import KVCache
from jaxlm.layers.initializers import dense
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.rotary import apply_rope, check_rotary_dim
from jaxlm.layers.validation import check_divides, check_positive, check_positive_float
from jaxlm.ops.attention import xla as attention_xla
from jaxlm.ops.sequence import segment_starts

QK_NORM_SCOPES = ("head", "all")


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    q_doc: jax.Array,
    k_pos: jax.Array,
    k_doc: jax.Array,
    *,
    scale: float,
    window: int | None,
    block_size: int | None = None,
) -> jax.Array:
    """Softmax attention where query t reads key s iff they share a document, s's position is at
    most t's, and (with a window) t − s < window.

    q: [B, T, H, K]; k: [B, Hk, S, K] and v: [B, Hk, S, V], head-major like the KV cache; q_pos:
    [T] and k_pos: [S] int positions (a negative key position marks an empty slot); q_doc: [B, T]
    and k_doc: [B, S] int document numbers. block_size: queries per block once T exceeds it
    (default ``ops.attention``'s ``QUERY_BLOCK``: a long prefill holds one block's scores).
    Returns [B, T, H, V] in v's dtype; float32 softmax with masks applied by ``where``.
    """
    b, t, h, dk = q.shape
    hk, dv = k.shape[1], v.shape[3]
    qg = q.astype(jnp.float32).reshape(b, t, hk, h // hk, dk)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

    def mask_fn(qpos_b, qdoc_b):  # [Tb], [B, Tb] -> [B, 1, 1, Tb, S]
        diff = qpos_b[:, None] - k_pos[None, :]  # [Tb, S]
        visible = (diff >= 0) & (k_pos >= 0)[None, :]
        if window is not None:
            visible = visible & (diff < window)
        return ((qdoc_b[:, :, None] == k_doc[:, None, :]) & visible[None])[:, None, None]

    # The same masked float32 softmax and query blocking as ops.attention; a query with no
    # visible key reads zeros.
    rows = attention_xla.QUERY_BLOCK if block_size is None else block_size
    o = attention_xla.attend_by_query_blocks(qg, kf, vf, q_pos, q_doc, mask_fn, scale, rows)
    return o.reshape(b, t, h, dv).astype(v.dtype)


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


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache,
    segment_ids: jax.Array | None,
    *,
    scale: float,
    window: int | None,
) -> tuple[jax.Array, KVCache]:
    """Attends T new queries over the cached keys and the T new ones, and writes the new keys.

    q: [B, T, H, K]; k: [B, T, Hk, K]; v: [B, T, Hk, V], RoPE already applied at positions
    cache.pos + [0, T). segment_ids: [B, T] or None; the call's first document continues the
    cache's last one. Returns o [B, T, H, V] and the updated cache.
    """
    b, t = q.shape[:2]
    slots = cache.k.shape[2]
    starts = segment_starts(segment_ids, b, t)
    q_doc = cache.doc[:, None] + jnp.cumsum(starts, axis=1, dtype=jnp.int32)  # [B, T]
    q_pos = cache.pos + jnp.arange(t, dtype=jnp.int32)  # [T]
    # The cache is head-major, [B, Hk, L, ·]: turn the T new tokens round, not the L cached ones.
    k = jnp.swapaxes(k, 1, 2).astype(cache.k.dtype)
    v = jnp.swapaxes(v, 1, 2).astype(cache.v.dtype)

    # Only the last `slots` new tokens can stay; their slots are distinct, so the scatter is exact.
    n = min(t, slots)
    write = jnp.mod(q_pos[t - n :], slots)

    if t == 1:
        # A decode step writes one slot, in place in the donated cache.
        new_k, new_v = write_slot(cache.k, k, write[0]), write_slot(cache.v, v, write[0])
        new_key_doc = jax.lax.dynamic_update_slice_in_dim(cache.key_doc, q_doc, write[0], axis=1)
    else:
        new_k = cache.k.at[:, :, write].set(k[:, :, t - n :])
        new_v = cache.v.at[:, :, write].set(v[:, :, t - n :])
        new_key_doc = cache.key_doc.at[:, write].set(q_doc[:, t - n :])
    new_cache = KVCache(
        k=new_k,
        v=new_v,
        key_doc=new_key_doc,
        doc=q_doc[:, -1],
        pos=cache.pos + t,
    )
    if window is None or t == 1:
        # Writing first loses nothing a query needs: a full cache overwrites no live slot, and a
        # one-token step in a ring of `window` slots overwrites a position `window` behind it.
        k_pos = slot_positions(new_cache.pos, slots)
        keys, values, k_doc = new_cache.k, new_cache.v, new_cache.key_doc
        o = masked_attention(q, keys, values, q_pos, q_doc, k_pos, k_doc, scale=scale, window=window)
    else:
        # A window prefill could overwrite keys its own earlier queries need: read the old ring
        # and the new tokens side by side instead.
        k_pos = jnp.concatenate([slot_positions(cache.pos, slots), q_pos])
        k_doc = jnp.concatenate([cache.key_doc, q_doc], axis=1)
        keys = jnp.concatenate([cache.k, k], axis=2)
        values = jnp.concatenate([cache.v, v], axis=2)
        o = masked_attention(q, keys, values, q_pos, q_doc, k_pos, k_doc, scale=scale, window=window)
    return o, new_cache


class Attention(nnx.Module):
    """Multi-head softmax attention with the options of Llama, Qwen3 and Qwen3-Next.

    Args:
      d_model: D. n_heads: H query heads. n_kv_heads: Hk key/value heads (GQA), dividing H;
        default H. head_dim: K; default D // H.
      rope_theta: RoPE base. rotary_dim: channels rotated per head (even, <= K); default K,
        0 for no position encoding.
      qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3); zero_centered_qk_norm
        stores those weights as offsets from 1 (Qwen3-Next). qk_norm_scope: "head" (the default)
        normalises each head's K channels; "all" normalises the whole q and k projections, H·K
        and Hk·K channels, before the split into heads (OLMoE).
      output_gate: multiply the attention output by sigmoid(gate_proj(x)) per channel before
        o_proj (Qwen3-Next's gated attention).
      window: None, or a causal sliding window: t − window < s <= t.
      norm_eps: for the QK norms.
    Projections are bias-free, normal(0.02).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        rotary_dim: int | None = None,
        qk_norm: bool = False,
        qk_norm_scope: str = "head",
        zero_centered_qk_norm: bool = False,
        output_gate: bool = False,
        window: int | None = None,
        norm_eps: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive(d_model=d_model, n_heads=n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        check_positive(n_kv_heads=n_kv_heads)
        check_divides("n_heads", n_heads, "n_kv_heads", n_kv_heads)
        if head_dim is None:
            check_divides("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        check_positive(head_dim=head_dim)
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        check_rotary_dim(rotary_dim, head_dim)
        check_positive_float(rope_theta=rope_theta, norm_eps=norm_eps)
        if window is not None:
            check_positive(window=window)
        if qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(f"qk_norm_scope must be one of {list(QK_NORM_SCOPES)}, got {qk_norm_scope!r}")

        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_theta, self.rotary_dim, self.window = float(rope_theta), rotary_dim, window
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = dense(d_model, n_heads * head_dim, **kw)
        self.k_proj = dense(d_model, n_kv_heads * head_dim, **kw)
        self.v_proj = dense(d_model, n_kv_heads * head_dim, **kw)
        self.gate_proj = dense(d_model, n_heads * head_dim, **kw) if output_gate else None
        self.o_proj = dense(n_heads * head_dim, d_model, **kw)
        norm_kw = dict(eps=norm_eps, zero_centered=zero_centered_qk_norm, dtype=dtype, param_dtype=param_dtype)
        whole = qk_norm_scope == "all"
        self.qk_norm_scope = qk_norm_scope
        self.q_norm = RMSNorm(n_heads * head_dim if whole else head_dim, **norm_kw) if qk_norm else None
        self.k_norm = RMSNorm(n_kv_heads * head_dim if whole else head_dim, **norm_kw) if qk_norm else None

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """L = max_len slots, or min(window, max_len) for a sliding window.

        max_len must cover every token the cache will see (prompt and new tokens): past it, the
        oldest slots are overwritten.
        """
        check_positive(batch_size=batch_size, max_len=max_len)
        slots = max_len if self.window is None else min(self.window, max_len)
        kv_shape = (batch_size, self.n_kv_heads, slots, self.head_dim)  # head-major, see KVCache
        return KVCache(
            k=jnp.zeros(kv_shape, self.dtype),
            v=jnp.zeros(kv_shape, self.dtype),
            key_doc=jnp.full((batch_size, slots), -1, jnp.int32),
            doc=jnp.zeros((batch_size,), jnp.int32),
            pos=jnp.zeros((), jnp.int32),
        )

    def __call__(
        self, x: jax.Array, *, segment_ids: jax.Array | None = None, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """x: [B, T, D] -> ([B, T, D], the updated cache or None)."""
        b, t, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.q_norm is not None and self.qk_norm_scope == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.n_heads, self.head_dim)
        k = k.reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        positions = jnp.arange(t, dtype=jnp.int32) if cache is None else cache.pos + jnp.arange(t, dtype=jnp.int32)
        rope = dict(theta=self.rope_theta, rotary_dim=self.rotary_dim)
        q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)

        scale = self.head_dim**-0.5
        if cache is None:
            o = ops.attention(q, k, v, causal=True, scale=scale, window=self.window, segment_ids=segment_ids)
            new_cache = None
        else:
            o, new_cache = cached_attention(q, k, v, cache, segment_ids, scale=scale, window=self.window)
        o = o.reshape(b, t, self.n_heads * self.head_dim)
        if self.gate_proj is not None:
            o = o * jax.nn.sigmoid(self.gate_proj(x))
        return self.o_proj(o), new_cache
