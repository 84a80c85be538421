"""Multi-head latent attention (MLA): DeepSeek-V2/V3's attention, and Kimi Linear's softmax layers.

Each token is compressed to one latent shared by every head,

  [c, k_r] = kv_a_proj_with_mqa(x)         c: [R] (kv_lora_rank), k_r: [P] (qk_rope_head_dim)
  c_kv     = kv_a_layernorm(c)              RMSNorm
  k_rope   = RoPE(k_r)                      one rotary key shared by all heads (MQA-like)

and kv_b_proj up-projects the latent to each head's key and value, W_b = [W_uk | W_uv] per head:
k_h = [c_kv·W_uk,h , k_rope] ([Kn + P], Kn = qk_nope_head_dim) and v_h = c_kv·W_uv,h ([V]). Queries
come from q_proj, or from q_a_proj -> q_a_layernorm -> q_b_proj with q_lora_rank; each head's query
is [q_nope (Kn), q_rope (P)] and q_rope gets the same RoPE. The softmax scale is (Kn + P)^-1/2.

Forms:
- No cache: the expanded form. k and v are built for every head and ``ops.attention`` runs
  (head dims Kn + P for q and k, V for v; the op takes V != K).
- A cache: the ``LatentCache`` keeps only c_kv [B, L, R] and k_rope [B, L, P] per token, R + P
  numbers against H·(Kn + P + V) for a KV cache. A prefill (T > 1) writes them and then expands
  the cache to run ``ops.cached_attention``'s form (its matmuls are the cheaper ones for many
  queries). A decode step (T == 1) runs the absorbed form on the compressed cache in place:
    q_lat,h = W_uk,h q_nope,h                                   a query in latent space [R]
    s_h,s   = scale·(q_lat,h·c_kv,s + q_rope,h·k_rope,s),  o_lat,h = Σ_s softmax(s_h)_s c_kv,s
    o_h     = W_uv,hᵀ o_lat,h                                   then o_proj as usual
  which equals the expanded form because q_nope·(W_uk,hᵀ c) = (W_uk,h q_nope)·c and the softmax
  weights are shared by the value up-projection.

RoPE layouts (``rope_layout``): "interleaved" rotates the pairs (0, 1), (2, 3), ... of the P
channels, as the DeepSeek-V2/V3 checkpoints store them (transformers' ``rope_interleave=True``,
the DeepSeek-V3 default); the rotated channels come out de-interleaved, evens then odds, exactly
as transformers' ``apply_rotary_pos_emb_interleave`` returns them, so the cached k_rope matches
theirs. "half" is the Llama layout of ``rotary.apply_rope`` (``rope_interleave=False``). None
rotates nothing: Kimi Linear's MLA is NoPE, its P shared key channels pass unrotated, and
qk_rope_head_dim = 0 drops them. Parameter names follow transformers' DeepseekV3Attention and
KimiLinearAttention one to one (kernels here are [in, out], theirs [out, in]).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float, Int

from jaxlm import ops
from jaxlm.axis_names import EMBED, HEADS
from jaxlm.layers.initializers import dense
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.rotary import apply_rope
from jaxlm.layers.validation import check_choice, check_positive, check_positive_float
from jaxlm.ops import nonfinite, validation
from jaxlm.ops.attention.api import poison_heads
from jaxlm.ops.attention.cached import CACHED_ATTENTION_FORMS, new_token_documents, slot_positions, write_tokens
from jaxlm.typing import Arr, Hidden, SegmentIds

ROPE_LAYOUTS = ("interleaved", "half", None)

_HIGHEST = jax.lax.Precision.HIGHEST

# Dimension letters beyond layers/cache.py's: R the latent rank (kv_lora_rank), P the shared
# rotary key channels (qk_rope_head_dim), Kn the non-rotary query/key channels per head.
LatentRows = Float[Arr, "B L R"]  # c_kv of the cache, or of the call's tokens (L = T)
RopeKeyRows = Float[Arr, "B L P"]  # k_rope, RoPE applied
LatentQueries = Float[Arr, "B T H R"]  # q_nope absorbed into latent space, and o before W_uv
RopeQueries = Float[Arr, "B T H P"]
SlotPositions = Int[Arr, "L"]
SlotDocs = Int[Arr, "B L"]
QueryPositions = Int[Arr, "T"]
QueryDocs = Int[Arr, "B T"]


class LatentCache(NamedTuple):
    """The decode cache of an MLA layer: the compressed latent of each token, not its keys and values.

    L slots; token position p lives in slot p mod L (past L tokens the oldest are overwritten, as
    in ``ops.KVCache``). The floats are c_kv and k_rope, B·L·(R + P) numbers in all; the rest is
    int32 bookkeeping with the meaning it has in KVCache. A non-finite latent is stored as zeros
    and ``last_bad`` remembers its position, so that the queries that would read it come out NaN.
    """

    c_kv: LatentRows  # [B, L, R] kv_a_layernorm(c), the latent both keys and values come from
    k_rope: RopeKeyRows  # [B, L, P] the shared rotary key, RoPE already applied
    key_doc: SlotDocs  # [B, L] int32 document number of each slot; -1 while empty
    doc: Int[Arr, "B"]  # [B] int32 document number of the row's last token
    pos: Int[Arr, ""]  # [] int32 tokens written so far: the position of the next token
    last_bad: Int[Arr, "B"]  # [B] int32 position of the last non-finite latent in the row's last document, -1 if none

    @classmethod
    def empty(cls, batch_size: int, slots: int, rank: int, rope_dim: int, dtype: Any) -> "LatentCache":
        """A cache of ``slots`` empty slots: c_kv [B, L, R] and k_rope [B, L, P] in ``dtype``."""
        return cls(
            c_kv=jnp.zeros((batch_size, slots, rank), dtype),
            k_rope=jnp.zeros((batch_size, slots, rope_dim), dtype),
            key_doc=jnp.full((batch_size, slots), -1, jnp.int32),
            doc=jnp.zeros((batch_size,), jnp.int32),
            pos=jnp.zeros((), jnp.int32),
            last_bad=jnp.full((batch_size,), -1, jnp.int32),
        )


def rope_shared(x: jax.Array, positions: jax.Array, *, theta: float, layout: str | None) -> jax.Array:
    """RoPE over all P channels of x [B, T, G, P] at positions [T] in ``layout`` (module doc).

    "interleaved" gathers the pairs (2i, 2i+1) to (i, i + P/2) and turns them as "half" does, so
    the output is de-interleaved; q and k get the same permutation, so their scores are those of
    pairwise rotation in place. Returns x's shape and dtype.
    """
    p = x.shape[-1]
    if layout is None or p == 0:
        return x
    if layout == "interleaved":
        x = x[..., np.concatenate([np.arange(0, p, 2), np.arange(1, p, 2)])]
    return apply_rope(x, positions, theta=theta, rotary_dim=p)


def absorbed_attention(
    q_lat: LatentQueries,
    q_rope: RopeQueries,
    c_kv: LatentRows,
    k_rope: RopeKeyRows,
    q_pos: QueryPositions,
    q_doc: QueryDocs,
    k_pos: SlotPositions,
    k_doc: SlotDocs,
    *,
    scale: float,
) -> LatentQueries:
    """MLA's absorbed attention over a latent cache, read in place: one key/value "head" shared
    by all H query heads, keys [c_kv, k_rope] and values c_kv.

    q_lat: [B, T, H, R] (W_uk already applied); q_rope: [B, T, H, P]; c_kv: [B, L, R]; k_rope:
    [B, L, P]; q_pos [T] and k_pos [L] positions (negative: an empty slot); q_doc [B, T] and k_doc
    [B, L] document numbers. Query t reads slot s iff same document and 0 <= k_pos[s] <= q_pos[t].
    Returns o_lat [B, T, H, R] float32 (apply W_uv next); float32 softmax, masks applied by where,
    a query that sees no slot gets zeros.
    """
    b, t, h, r = q_lat.shape
    slots, p = c_kv.shape[1], k_rope.shape[2]
    batch = ((0,), (0,))
    cf = c_kv.astype(jnp.float32)
    # [B, T·H, R] against [B, L, R]: batch B, contract R. The cache is never transposed or copied.
    s = jax.lax.dot_general(
        q_lat.astype(jnp.float32).reshape(b, t * h, r), cf, (((2,), (2,)), batch), precision=_HIGHEST
    )
    if p:
        s = s + jax.lax.dot_general(
            q_rope.astype(jnp.float32).reshape(b, t * h, p), k_rope.astype(jnp.float32),
            (((2,), (2,)), batch), precision=_HIGHEST,
        )
    s = s.reshape(b, t, h, slots) * scale
    visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])  # [T, L]
    mask = ((q_doc[:, :, None] == k_doc[:, None, :]) & visible[None])[:, :, None, :]  # [B, T, 1, L]
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    w = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(w, axis=-1, keepdims=True)
    w = w / jnp.where(denom > 0, denom, 1.0)
    o = jax.lax.dot_general(w.reshape(b, t * h, slots), cf, (((2,), (1,)), batch), precision=_HIGHEST)
    return o.reshape(b, t, h, r)


def _check_rope_dim(qk_rope_head_dim: Any, rope_layout: str | None) -> None:
    if isinstance(qk_rope_head_dim, bool) or not isinstance(qk_rope_head_dim, int) or qk_rope_head_dim < 0:
        raise ValueError(f"qk_rope_head_dim must be an int >= 0, got {qk_rope_head_dim!r}")
    if rope_layout is not None and qk_rope_head_dim % 2:
        raise ValueError(
            f"qk_rope_head_dim must be even to be rotated in pairs (rope_layout={rope_layout!r}), "
            f"got {qk_rope_head_dim}; use rope_layout=None for unrotated shared key channels"
        )


class MultiHeadLatentAttention(nnx.Module):
    """Multi-head latent attention, as transformers' DeepseekV3Attention and KimiLinearAttention.

    Args:
      d_model: D. n_heads: H.
      kv_lora_rank: R, the width of the cached latent c_kv.
      qk_nope_head_dim: Kn, the per-head query/key channels without RoPE (from kv_b_proj).
      qk_rope_head_dim: P, the rotary channels of each query and of the one key shared by all
        heads; 0 for none.
      v_head_dim: V, the per-head value width.
      q_lora_rank: None for a plain q_proj; else the rank of q_a_proj -> q_a_layernorm -> q_b_proj.
      rope_theta: RoPE base. rope_layout: "interleaved" (DeepSeek-V2/V3 checkpoints), "half"
        (rotate-half, as Llama) or None (no rotation: Kimi Linear's NoPE MLA); see the module doc.
      softmax_scale: multiplies the scores; default (Kn + P)^-1/2. (DeepSeek-V3 with YaRN scales it
        by mscale², as transformers' ``yarn_apply_mscale``; YaRN's frequencies are not modelled.)
      norm_eps: of q_a_layernorm and kv_a_layernorm (transformers builds both with 1e-6).
    Projections are bias-free, normal(0.02); parameters: q_proj or q_a_proj, q_a_layernorm,
    q_b_proj; kv_a_proj_with_mqa [D, R + P]; kv_a_layernorm [R]; kv_b_proj [R, H·(Kn + V)], each
    head's Kn key columns then its V value columns; o_proj [H·V, D].
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        rope_theta: float = 10000.0,
        rope_layout: str | None = "interleaved",
        softmax_scale: float | None = None,
        norm_eps: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive(
            d_model=d_model, n_heads=n_heads, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
            v_head_dim=v_head_dim,
        )
        check_choice("rope_layout", rope_layout, ROPE_LAYOUTS)
        _check_rope_dim(qk_rope_head_dim, rope_layout)
        if q_lora_rank is not None:
            check_positive(q_lora_rank=q_lora_rank)
        check_positive_float(rope_theta=rope_theta, norm_eps=norm_eps)
        if softmax_scale is not None:
            check_positive_float(softmax_scale=softmax_scale)

        self.n_heads, self.kv_lora_rank, self.q_lora_rank = n_heads, kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope_theta, self.rope_layout = float(rope_theta), rope_layout
        self.scale = self.qk_head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm_kw = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        q_width = n_heads * self.qk_head_dim
        if q_lora_rank is None:
            self.q_proj = dense(d_model, q_width, axes=(EMBED, HEADS), **kw)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = dense(d_model, q_lora_rank, axes=(EMBED, None), **kw)
            self.q_a_layernorm = RMSNorm(q_lora_rank, **norm_kw)
            self.q_b_proj = dense(q_lora_rank, q_width, axes=(None, HEADS), **kw)
        self.kv_a_proj_with_mqa = dense(d_model, kv_lora_rank + qk_rope_head_dim, axes=(EMBED, None), **kw)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, **norm_kw)
        self.kv_b_proj = dense(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), axes=(None, HEADS), **kw)
        self.o_proj = dense(n_heads * v_head_dim, d_model, axes=(HEADS, EMBED), **kw)

    def init_cache(self, batch_size: int, max_len: int) -> LatentCache:
        """L = max_len slots of c_kv [R] and k_rope [P], in the compute dtype.

        max_len must cover every token the cache will see (prompt and new tokens): past it, the
        oldest slots are overwritten.
        """
        check_positive(batch_size=batch_size, max_len=max_len)
        return LatentCache.empty(batch_size, max_len, self.kv_lora_rank, self.qk_rope_head_dim, self.dtype)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: LatentCache | None = None
    ) -> tuple[Hidden, LatentCache | None]:
        """x: [B, T, D] -> ([B, T, D], the updated cache or None).

        Without a cache: the expanded form over the sequence, documents of segment_ids kept apart.
        With one: the call's first document continues the cache's last one; T == 1 decodes with
        the absorbed form, T > 1 prefills (module doc).
        """
        b, t, _ = x.shape
        h, kn, p, r = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(b, t, h, self.qk_head_dim)
        latent = self.kv_a_proj_with_mqa(x)  # [B, T, R + P]
        c_kv = self.kv_a_layernorm(latent[..., :r])  # [B, T, R]
        if cache is not None:
            self._check_cache(cache, b)
        positions = jnp.arange(t, dtype=jnp.int32)
        if cache is not None:
            positions = cache.pos + positions
        rope = dict(theta=self.rope_theta, layout=self.rope_layout)
        q_rope = rope_shared(q[..., kn:], positions, **rope)
        k_rope = rope_shared(latent[..., None, r:], positions, **rope)[:, :, 0]  # [B, T, P]
        q = jnp.concatenate([q[..., :kn], q_rope], axis=-1)

        if cache is None:
            k_nope, v = self._expand(c_kv)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (b, t, h, p))], axis=-1)
            o = ops.attention(q, k, v, causal=True, scale=self.scale, segment_ids=segment_ids)
            new_cache = None
        else:
            o, new_cache = self._cached(q, c_kv, k_rope, cache, segment_ids)
        return self.o_proj(o.reshape(b, t, h * self.v_head_dim)), new_cache

    def _expand(self, c_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """c_kv [B, S, R] -> (k_nope [B, S, H, Kn], v [B, S, H, V]) through kv_b_proj."""
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).reshape(b, s, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        return kv[..., : self.qk_nope_head_dim], kv[..., self.qk_nope_head_dim :]

    def _check_cache(self, cache: Any, batch: int) -> None:
        if not isinstance(cache, LatentCache):
            raise ValueError(f"cache must be a LatentCache (from init_cache), got {type(cache).__name__}")
        slots = np.shape(cache.c_kv)[1] if np.ndim(cache.c_kv) == 3 else None
        want = ((batch, slots, self.kv_lora_rank), (batch, slots, self.qk_rope_head_dim))
        if (np.shape(cache.c_kv), np.shape(cache.k_rope)) != want:
            raise ValueError(
                f"cache.c_kv must have shape [B={batch}, L, R={self.kv_lora_rank}] and cache.k_rope "
                f"[B={batch}, L, P={self.qk_rope_head_dim}], got {np.shape(cache.c_kv)} and {np.shape(cache.k_rope)}"
            )

    def _cached(
        self, q: jax.Array, c_kv: jax.Array, k_rope: jax.Array, cache: LatentCache, segment_ids: SegmentIds | None
    ) -> tuple[jax.Array, LatentCache]:
        """Writes the call's latents into the cache and attends q [B, T, H, Kn + P] over it.

        Returns (o [B, T, H, V] in the compute dtype, the new cache).
        """
        b, t, h, _ = q.shape
        kn, slots = self.qk_nope_head_dim, cache.c_kv.shape[1]
        validation.check_segment_ids(segment_ids, b, t)
        starts, q_doc, q_pos = new_token_documents(cache, segment_ids, b, t)
        # Non-finite values are stored as zeros and put back where they reach (ops.nonfinite).
        q, bad_queries = nonfinite.isolate(q, 3)
        bad = ~(jnp.isfinite(c_kv).all(axis=-1) & jnp.isfinite(k_rope).all(axis=-1))  # [B, T]
        c_kv = nonfinite.finite_or_zero(c_kv).astype(cache.c_kv.dtype)
        k_rope = nonfinite.finite_or_zero(k_rope).astype(cache.k_rope.dtype)
        last_bad = nonfinite.last_bad_position(bad[..., None], q_pos, starts, cache.last_bad[:, None])[..., 0]

        # write_tokens takes head-major [B, Hk, L, ·] buffers: here with a single "head".
        (new_c, new_r), new_doc = write_tokens(
            (cache.c_kv[:, None], cache.k_rope[:, None]), (c_kv[:, None], k_rope[:, None]), cache.key_doc, q_doc, q_pos
        )
        new_c, new_r = new_c[:, 0], new_r[:, 0]
        new = LatentCache(
            c_kv=new_c, k_rope=new_r, key_doc=new_doc, doc=q_doc[:, -1], pos=cache.pos + t, last_bad=last_bad[:, -1]
        )
        k_pos = slot_positions(new.pos, slots)

        if t == 1:
            # Absorbed: W_uk into the query, W_uv after the attention; the cache stays compressed.
            w_b = self.kv_b_proj.kernel[...].astype(jnp.float32).reshape(self.kv_lora_rank, h, -1)
            w_uk, w_uv = w_b[..., :kn], w_b[..., kn:]  # [R, H, Kn], [R, H, V]
            q_lat = jnp.einsum("bthn,rhn->bthr", q[..., :kn].astype(jnp.float32), w_uk, precision=_HIGHEST)
            o_lat = absorbed_attention(
                q_lat, q[..., kn:], new.c_kv, new.k_rope, q_pos, q_doc, k_pos, new.key_doc, scale=self.scale
            )
            o = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv, precision=_HIGHEST).astype(self.dtype)
        else:
            # Expanded over the cache: every slot's keys and values, head-major [B, H, L, ·].
            k_nope, v = self._expand(new.c_kv)
            k_r = jnp.broadcast_to(new.k_rope[:, :, None], (b, slots, h, self.qk_rope_head_dim))
            keys = jnp.swapaxes(jnp.concatenate([k_nope, k_r.astype(k_nope.dtype)], axis=-1), 1, 2)
            o = CACHED_ATTENTION_FORMS.run(
                None, q, keys, jnp.swapaxes(v, 1, 2), q_pos, q_doc, k_pos, new.key_doc, scale=self.scale, window=None
            ).astype(self.dtype)
        return poison_heads(o, bad_queries, (last_bad >= 0)[..., None]), new
