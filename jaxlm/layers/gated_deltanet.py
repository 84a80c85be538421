"""Gated DeltaNet (Yang et al. 2024; Qwen3-Next's linear layers) through ``ops.gated_delta_rule``,
and with ``decay=False`` plain DeltaNet through ``ops.delta_rule``.

Per token: q, k, v projections, each through a short causal conv and SiLU (one depthwise conv
over the concatenated channels, as Qwen3-Next stores it; a depthwise conv is per channel, so
this equals three separate ones); q and k L2-normalised per head;
  g = −exp(A_log) · softplus(a_proj(x) + dt_bias)   (log decay ≤ 0, per value head),
  β = sigmoid(b_proj(x)), or 2·sigmoid(b_proj(x)) with allow_neg_eigval (β ∈ (0, 2): the
      transition I − βkkᵀ may then have negative eigenvalues, which helps state tracking);
then S ← exp(g) S, S ← S + k (β (v − Sᵀk))ᵀ, o = Sᵀ(q·K^-1/2); o through a gated RMSNorm per
value head with z = g_proj(x) (norm(o)·w·silu(z)); o_proj.

``decay=False`` drops g (no a_proj, A_log or dt_bias): S ← S + k (β (v − Sᵀk))ᵀ, DeltaNet
(Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule") with everything else
as above, so that the two differ in the decay alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops
from jaxlm.axis_names import EMBED, HEADS
from jaxlm.layers import initializers as init
from jaxlm.layers.cache import RecurrentCache, recurrence_kwargs
from jaxlm.layers.norms import GatedRMSNorm
from jaxlm.layers.validation import check_divides, check_positive, check_positive_float
from jaxlm.typing import Hidden, SegmentIds

# fla's l2norm epsilon: x / sqrt(Σx² + eps).
L2_EPS = 1e-6


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
    """x / sqrt(sum(x², last axis) + eps), in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def conv_qkv(
    layer: nnx.Module, x: Hidden, segment_ids: SegmentIds | None, cache: RecurrentCache | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """The q, k, v of a delta-rule layer (Gated DeltaNet, KDA): the three projections through one
    depthwise causal conv and SiLU, q and k L2-normalised per head.

    ``layer`` holds q_proj, k_proj, v_proj, conv_weight [2·H·K + HV·V, W], n_heads, head_dim,
    n_v_heads, head_v_dim and dtype. x: [B, T, D] -> q, k [B, T, H, K] and v [B, T, HV, V] in the
    compute dtype, and the conv state [B, W-1, C] (None without a cache).
    """
    b, t, _ = x.shape
    key_dim = layer.n_heads * layer.head_dim
    qkv = jnp.concatenate([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], axis=-1)
    qkv, conv_state = ops.causal_conv1d(
        qkv,
        layer.conv_weight[...].astype(layer.dtype),
        activation="silu",
        initial_state=None if cache is None else cache.conv,
        output_final_state=cache is not None,
        segment_ids=segment_ids,
    )
    q, k, v = jnp.split(qkv, [key_dim, 2 * key_dim], axis=-1)
    q = l2_normalize(q.reshape(b, t, layer.n_heads, layer.head_dim)).astype(layer.dtype)
    k = l2_normalize(k.reshape(b, t, layer.n_heads, layer.head_dim)).astype(layer.dtype)
    return q, k, v.reshape(b, t, layer.n_v_heads, layer.head_v_dim), conv_state


class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet mixer.

    Args:
      d_model: D. n_heads: H query/key heads. head_dim: K; default D // H.
      n_v_heads: HV value heads, a multiple of H (grouped values); default H.
      head_v_dim: V; default K.
      conv_size: W of the short convs. allow_neg_eigval: β = 2·sigmoid(b).
      decay: the gate g; False gives plain DeltaNet (``ops.delta_rule``), without a_proj, A_log, dt_bias.
      a_init_range, dt_min, dt_max, dt_init_floor: A_log and dt_bias at init, as Mamba-2.
      norm_eps: of the output gated RMSNorm.
      impl, chunk_size: passed to ``ops.gated_delta_rule`` for full sequences and prefill.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        n_v_heads: int | None = None,
        head_v_dim: int | None = None,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        decay: bool = True,
        a_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        impl: str | None = None,
        chunk_size: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive(d_model=d_model, n_heads=n_heads, conv_size=conv_size)
        if head_dim is None:
            check_divides("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        n_v_heads = n_heads if n_v_heads is None else n_v_heads
        head_v_dim = head_dim if head_v_dim is None else head_v_dim
        check_positive(head_dim=head_dim, n_v_heads=n_v_heads, head_v_dim=head_v_dim)
        check_divides("n_v_heads", n_v_heads, "n_heads", n_heads)
        lo, hi = a_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"a_init_range must be (lo, hi) with 0 < lo <= hi, got {a_init_range!r}")
        check_positive_float(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, norm_eps=norm_eps)

        self.n_heads, self.head_dim, self.n_v_heads, self.head_v_dim = n_heads, head_dim, n_v_heads, head_v_dim
        self.key_dim, self.value_dim = n_heads * head_dim, n_v_heads * head_v_dim
        self.conv_size, self.allow_neg_eigval, self.decay = conv_size, allow_neg_eigval, decay
        self.impl, self.chunk_size, self.dtype = impl, chunk_size, dtype
        self.conv_dim = 2 * self.key_dim + self.value_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = init.dense(d_model, self.key_dim, axes=(EMBED, HEADS), **kw)
        self.k_proj = init.dense(d_model, self.key_dim, axes=(EMBED, HEADS), **kw)
        self.v_proj = init.dense(d_model, self.value_dim, axes=(EMBED, HEADS), **kw)
        self.a_proj = init.dense(d_model, n_v_heads, axes=(EMBED, HEADS), **kw) if decay else None
        self.b_proj = init.dense(d_model, n_v_heads, axes=(EMBED, HEADS), **kw)
        self.g_proj = init.dense(d_model, self.value_dim, axes=(EMBED, HEADS), **kw)
        conv = init.conv_weight(rngs.params(), self.conv_dim, conv_size, param_dtype)
        self.conv_weight = init.param(conv, (HEADS, None))
        if decay:
            self.A_log = init.param(init.a_log_init(rngs.params(), n_v_heads, (lo, hi), param_dtype), (None,))
            dt_bias = init.dt_bias_init(rngs.params(), n_v_heads, dt_min, dt_max, dt_init_floor, param_dtype)
            self.dt_bias = init.param(dt_bias, (None,))
        else:
            self.A_log = self.dt_bias = None
        self.o_norm = GatedRMSNorm(
            head_v_dim, eps=norm_eps, norm_before_gate=True, dtype=dtype, param_dtype=param_dtype
        )
        self.o_proj = init.dense(self.value_dim, d_model, axes=(HEADS, EMBED), **kw)

    def init_cache(self, batch_size: int, max_len: int) -> RecurrentCache:
        """State [B, HV, K, V] and conv state [B, W-1, 2·H·K + HV·V], float32; max_len is unused."""
        check_positive(batch_size=batch_size, max_len=max_len)
        return RecurrentCache(
            state=jnp.zeros((batch_size, self.n_v_heads, self.head_dim, self.head_v_dim), jnp.float32),
            conv=jnp.zeros((batch_size, self.conv_size - 1, self.conv_dim), jnp.float32),
        )

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: RecurrentCache | None = None
    ) -> tuple[Hidden, RecurrentCache | None]:
        """x: [B, T, D] -> ([B, T, D], the updated cache or None)."""
        b, t, _ = x.shape
        q, k, v, conv_state = conv_qkv(self, x, segment_ids, cache)
        f32 = jnp.float32
        beta = jax.nn.sigmoid(self.b_proj(x).astype(f32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        common = dict(
            scale=self.head_dim**-0.5, segment_ids=segment_ids, chunk_size=self.chunk_size,
            **recurrence_kwargs(cache, t, self.impl),
        )
        if self.decay:
            a = self.a_proj(x).astype(f32) + self.dt_bias[...].astype(f32)
            g = -jnp.exp(self.A_log[...].astype(f32)) * jax.nn.softplus(a)  # [B, T, HV]
            o, state = ops.gated_delta_rule(q, k, v, g, beta, **common)
        else:
            o, state = ops.delta_rule(q, k, v, beta, **common)
        z = self.g_proj(x).reshape(b, t, self.n_v_heads, self.head_v_dim)
        o = self.o_norm(o, z).reshape(b, t, self.value_dim)
        new_cache = None if cache is None else RecurrentCache(state=state, conv=conv_state)
        return self.o_proj(o), new_cache
