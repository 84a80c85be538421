"""MiniMax Lightning attention (MiniMax-01) through ``ops.simple_gla`` with a constant decay.

Per token: q, k, v = silu(projections); per head h a constant decay exp(−λ_h),
  λ_h = 2^(−8(h+1)/H) · (1 − layer_idx/(n_layers − 1 + 1e-5) + 1e-5),
ALiBi's slopes scaled by depth so that the last layers hardly decay; S_t = e^(−λ_h) S_{t-1} +
k_t v_tᵀ and o_t = S_tᵀ q_t (no 1/sqrt(K) scale, as MiniMax); then RMSNorm over all H·V
channels, times sigmoid(output_gate(x)); out_proj.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import ops
from jaxlm.axis_names import EMBED, HEADS
from jaxlm.layers import initializers as init
from jaxlm.layers.cache import RecurrentCache, recurrence_kwargs
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.validation import check_divides, check_positive, check_positive_float
from jaxlm.typing import Hidden, SegmentIds


def lightning_log_decay(n_heads: int, layer_idx: int, n_layers: int) -> np.ndarray:
    """[H] float32 g_gamma = −λ_h, the per-head log decay of layer ``layer_idx`` of ``n_layers``."""
    slopes = 2.0 ** (-8.0 * np.arange(1, n_heads + 1) / n_heads)
    depth = 1.0 - layer_idx / (n_layers - 1 + 1e-5) + 1e-5
    return (-slopes * depth).astype(np.float32)


class LightningAttention(nnx.Module):
    """Lightning attention mixer.

    Args:
      d_model: D. n_heads: H. head_dim: K = V; default D // H.
      layer_idx, n_layers: this layer's depth in the stack, which sets the decays.
      norm_eps: of the output RMSNorm. impl, chunk_size: passed to ``ops.simple_gla``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        layer_idx: int = 0,
        n_layers: int = 1,
        norm_eps: float = 1e-6,
        impl: str | None = None,
        chunk_size: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive(d_model=d_model, n_heads=n_heads, n_layers=n_layers)
        if head_dim is None:
            check_divides("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        check_positive(head_dim=head_dim)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < n_layers:
            raise ValueError(f"layer_idx must be an int in [0, n_layers={n_layers}), got {layer_idx!r}")
        check_positive_float(norm_eps=norm_eps)

        self.n_heads, self.head_dim = n_heads, head_dim
        self.impl, self.chunk_size, self.dtype = impl, chunk_size, dtype
        # A constant of the architecture, not a parameter: a static tuple, never trained.
        self.g_gamma = tuple(float(g) for g in lightning_log_decay(n_heads, layer_idx, n_layers))
        inner = n_heads * head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = init.dense(d_model, inner, axes=(EMBED, HEADS), **kw)
        self.k_proj = init.dense(d_model, inner, axes=(EMBED, HEADS), **kw)
        self.v_proj = init.dense(d_model, inner, axes=(EMBED, HEADS), **kw)
        self.output_gate = init.dense(d_model, inner, axes=(EMBED, HEADS), **kw)
        self.norm = RMSNorm(inner, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.out_proj = init.dense(inner, d_model, axes=(HEADS, EMBED), **kw)

    def init_cache(self, batch_size: int, max_len: int) -> RecurrentCache:
        """State [B, H, K, K] float32, no conv; max_len is unused."""
        check_positive(batch_size=batch_size, max_len=max_len)
        state = jnp.zeros((batch_size, self.n_heads, self.head_dim, self.head_dim), jnp.float32)
        return RecurrentCache(state=state, conv=None)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: RecurrentCache | None = None
    ) -> tuple[Hidden, RecurrentCache | None]:
        """x: [B, T, D] -> ([B, T, D], the updated cache or None)."""
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        q = jax.nn.silu(self.q_proj(x)).reshape(shape)
        k = jax.nn.silu(self.k_proj(x)).reshape(shape)
        v = jax.nn.silu(self.v_proj(x)).reshape(shape)
        o, state = ops.simple_gla(
            q,
            k,
            v,
            g_gamma=jnp.asarray(self.g_gamma, jnp.float32),
            scale=1.0,
            segment_ids=segment_ids,
            chunk_size=self.chunk_size,
            **recurrence_kwargs(cache, t, self.impl),
        )
        o = self.norm(o.reshape(b, t, self.n_heads * self.head_dim))
        o = o * jax.nn.sigmoid(self.output_gate(x))
        new_cache = None if cache is None else RecurrentCache(state=state, conv=None)
        return self.out_proj(o), new_cache
