"""Plain causal linear attention (Katharopoulos et al. 2020) through ``ops.linear_attn``.

Per token: q, k = φ(projections) with a feature map φ (elu+1 by default), v a projection;
  o_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)      (normalize=True)
then optionally RMSNorm per head, and o_proj.

The normaliser must survive a decode step, but ``ops.linear_attn(normalize=True)`` normalises
over the tokens of one call only. So the layer appends a column of ones to v: the extra state
column is Σ k_s, the extra output column is the denominator, and both carry through the cache and
reset at document boundaries with the rest of the state. The cached state is [B, H, K, V+1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops
from jaxlm.axis_names import EMBED, HEADS
from jaxlm.layers import initializers as init
from jaxlm.layers.cache import RecurrentCache, recurrence_kwargs
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.validation import check_choice, check_divides, check_positive, check_positive_float
from jaxlm.typing import Hidden, SegmentIds

FEATURE_MAPS = {
    "elu1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}
# Positive feature maps: only these keep the normaliser away from zero.
_POSITIVE_MAPS = ("elu1", "relu")

# Added to the denominator so that an all-zero prefix (relu features) gives 0, not NaN.
NORMALIZER_EPS = 1e-6


class LinearAttention(nnx.Module):
    """Linear attention mixer.

    Args:
      d_model: D. n_heads: H. head_dim: K; default D // H. head_v_dim: V; default K.
      feature_map: "elu1" (elu(x)+1), "relu" or "identity", applied to q and k.
      normalize: divide by the running normaliser; needs a positive feature map.
      output_norm: RMSNorm per head before o_proj (fla's default, stabilises unnormalised forms).
      norm_eps: of that norm. impl, chunk_size: passed to ``ops.linear_attn``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        head_v_dim: int | None = None,
        feature_map: str = "elu1",
        normalize: bool = True,
        output_norm: bool = False,
        norm_eps: float = 1e-5,
        impl: str | None = None,
        chunk_size: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive(d_model=d_model, n_heads=n_heads)
        if head_dim is None:
            check_divides("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        head_v_dim = head_dim if head_v_dim is None else head_v_dim
        check_positive(head_dim=head_dim, head_v_dim=head_v_dim)
        check_choice("feature_map", feature_map, FEATURE_MAPS)
        if normalize and feature_map not in _POSITIVE_MAPS:
            raise ValueError(f"normalize=True needs a positive feature_map {_POSITIVE_MAPS}, got {feature_map!r}")
        check_positive_float(norm_eps=norm_eps)

        self.n_heads, self.head_dim, self.head_v_dim = n_heads, head_dim, head_v_dim
        self.feature_map, self.normalize = feature_map, normalize
        self.impl, self.chunk_size, self.dtype = impl, chunk_size, dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = init.dense(d_model, n_heads * head_dim, axes=(EMBED, HEADS), **kw)
        self.k_proj = init.dense(d_model, n_heads * head_dim, axes=(EMBED, HEADS), **kw)
        self.v_proj = init.dense(d_model, n_heads * head_v_dim, axes=(EMBED, HEADS), **kw)
        self.o_norm = RMSNorm(head_v_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype) if output_norm else None
        self.o_proj = init.dense(n_heads * head_v_dim, d_model, axes=(HEADS, EMBED), **kw)

    def init_cache(self, batch_size: int, max_len: int) -> RecurrentCache:
        """State [B, H, K, V(+1 with normalize)] float32, no conv; max_len is unused."""
        check_positive(batch_size=batch_size, max_len=max_len)
        dv = self.head_v_dim + (1 if self.normalize else 0)
        return RecurrentCache(state=jnp.zeros((batch_size, self.n_heads, self.head_dim, dv), jnp.float32), conv=None)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: RecurrentCache | None = None
    ) -> tuple[Hidden, RecurrentCache | None]:
        """x: [B, T, D] -> ([B, T, D], the updated cache or None)."""
        b, t, _ = x.shape
        h, dk, dv = self.n_heads, self.head_dim, self.head_v_dim
        phi = FEATURE_MAPS[self.feature_map]
        q = phi(self.q_proj(x).reshape(b, t, h, dk))
        k = phi(self.k_proj(x).reshape(b, t, h, dk))
        v = self.v_proj(x).reshape(b, t, h, dv)
        if self.normalize:
            # float32, so that the denominator column is not rounded to the compute dtype.
            v = jnp.concatenate([v.astype(jnp.float32), jnp.ones((b, t, h, 1), jnp.float32)], axis=-1)
        o, state = ops.linear_attn(
            q, k, v, segment_ids=segment_ids, chunk_size=self.chunk_size, **recurrence_kwargs(cache, t, self.impl)
        )
        if self.normalize:
            o = o.astype(jnp.float32)
            o = o[..., :dv] / (o[..., dv:] + NORMALIZER_EPS)
        if self.o_norm is not None:
            o = self.o_norm(o)
        o = o.astype(self.dtype).reshape(b, t, h * dv)
        new_cache = None if cache is None else RecurrentCache(state=state, conv=None)
        return self.o_proj(o), new_cache
