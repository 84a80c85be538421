"""Softmax attention: RoPE, GQA, optional QK RMSNorm, sigmoid output gate and sliding window.

Without a cache the full sequence runs through ``ops.attention``. With a ``KVCache`` the new keys
and values go through ``ops.cached_attention``, which writes them into the cache and attends the
queries over the cached ones. The layer holds the parameters, applies RoPE at the cache's
positions and sizes the cache: ``window`` slots, a ring buffer, for a sliding-window layer.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops
from jaxlm.axis_names import EMBED, HEADS
from jaxlm.layers.initializers import dense
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.rotary import apply_rope, check_rotary_dim
from jaxlm.layers.validation import check_divides, check_positive, check_positive_float
from jaxlm.ops import KVCache
from jaxlm.typing import Hidden, SegmentIds

QK_NORM_SCOPES = ("head", "all")


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
        self.q_proj = dense(d_model, n_heads * head_dim, axes=(EMBED, HEADS), **kw)
        self.k_proj = dense(d_model, n_kv_heads * head_dim, axes=(EMBED, HEADS), **kw)
        self.v_proj = dense(d_model, n_kv_heads * head_dim, axes=(EMBED, HEADS), **kw)
        self.gate_proj = dense(d_model, n_heads * head_dim, axes=(EMBED, HEADS), **kw) if output_gate else None
        self.o_proj = dense(n_heads * head_dim, d_model, axes=(HEADS, EMBED), **kw)
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
        return KVCache.empty(batch_size, self.n_kv_heads, slots, self.head_dim, self.head_dim, self.dtype)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: KVCache | None = None
    ) -> tuple[Hidden, KVCache | None]:
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
            o, new_cache = ops.cached_attention(
                q, k, v, cache, scale=scale, window=self.window, segment_ids=segment_ids
            )
        o = o.reshape(b, t, self.n_heads * self.head_dim)
        if self.gate_proj is not None:
            o = o * jax.nn.sigmoid(self.gate_proj(x))
        return self.o_proj(o), new_cache
