"""Kimi Delta Attention (Kimi Linear's linear layers) through ``ops.kda``.

Gated DeltaNet with a decay per key channel instead of per head. Per token: q, k, v
projections through one short causal conv and SiLU; q and k L2-normalised per head;
  g = −exp(A_log_h) · softplus(f_b(f_a(x)) + dt_bias)   [B, T, H, K], ≤ 0: a low-rank gate of
      rank r (default K), one A per head and one dt_bias per channel;
  β = sigmoid(b_proj(x))                                 [B, T, H];
then S ← diag(exp(g)) S, S ← S + k (β (v − Sᵀk))ᵀ, o = Sᵀ(q·K^-1/2); o through an RMSNorm per
head gated by a sigmoid of a second low-rank projection, norm(o)·w·sigmoid(g_b(g_a(x))); o_proj.
Parameter names follow transformers' KimiLinearDeltaAttention (f_a_proj, f_b_proj, g_a_proj,
g_b_proj, b_proj, A_log, dt_bias, o_norm), kernels [in, out] where theirs are [out, in].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops
from jaxlm.axis_names import EMBED, HEADS
from jaxlm.layers import initializers as init
from jaxlm.layers.cache import RecurrentCache, recurrence_kwargs
from jaxlm.layers.gated_deltanet import conv_qkv
from jaxlm.layers.norms import GatedRMSNorm
from jaxlm.layers.validation import check_divides, check_positive, check_positive_float
from jaxlm.typing import Hidden, SegmentIds


class KimiDeltaAttention(nnx.Module):
    """KDA mixer.

    Args:
      d_model: D. n_heads: H (one value head per query/key head, as Kimi Linear).
      head_dim: K; default D // H. head_v_dim: V; default K.
      gate_low_rank_dim: r of the decay's and the output gate's low-rank projections; default K.
      conv_size: W of the short conv.
      a_init_range, dt_min, dt_max, dt_init_floor: A_log (per head) and dt_bias (per channel) at
        init, as Mamba-2 and Gated DeltaNet.
      norm_eps: of the output gated RMSNorm.
      impl, chunk_size: passed to ``ops.kda`` for full sequences and prefill.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        head_v_dim: int | None = None,
        gate_low_rank_dim: int | None = None,
        conv_size: int = 4,
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
        head_v_dim = head_dim if head_v_dim is None else head_v_dim
        rank = head_dim if gate_low_rank_dim is None else gate_low_rank_dim
        check_positive(head_dim=head_dim, head_v_dim=head_v_dim, gate_low_rank_dim=rank)
        lo, hi = a_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"a_init_range must be (lo, hi) with 0 < lo <= hi, got {a_init_range!r}")
        check_positive_float(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, norm_eps=norm_eps)

        # n_v_heads = n_heads: the attribute conv_qkv and the cache read.
        self.n_heads = self.n_v_heads = n_heads
        self.head_dim, self.head_v_dim = head_dim, head_v_dim
        self.key_dim, self.value_dim = n_heads * head_dim, n_heads * head_v_dim
        self.conv_size, self.impl, self.chunk_size, self.dtype = conv_size, impl, chunk_size, dtype
        self.conv_dim = 2 * self.key_dim + self.value_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = init.dense(d_model, self.key_dim, axes=(EMBED, HEADS), **kw)
        self.k_proj = init.dense(d_model, self.key_dim, axes=(EMBED, HEADS), **kw)
        self.v_proj = init.dense(d_model, self.value_dim, axes=(EMBED, HEADS), **kw)
        conv = init.conv_weight(rngs.params(), self.conv_dim, conv_size, param_dtype)
        self.conv_weight = init.param(conv, (HEADS, None))
        # The low-rank middles are small: every device holds them whole.
        self.f_a_proj = init.dense(d_model, rank, axes=(EMBED, None), **kw)
        self.f_b_proj = init.dense(rank, self.key_dim, axes=(None, HEADS), **kw)
        self.A_log = init.param(init.a_log_init(rngs.params(), n_heads, (lo, hi), param_dtype), (None,))
        dt_bias = init.dt_bias_init(rngs.params(), self.key_dim, dt_min, dt_max, dt_init_floor, param_dtype)
        self.dt_bias = init.param(dt_bias, (HEADS,))
        self.b_proj = init.dense(d_model, n_heads, axes=(EMBED, HEADS), **kw)
        self.g_a_proj = init.dense(d_model, rank, axes=(EMBED, None), **kw)
        self.g_b_proj = init.dense(rank, self.value_dim, axes=(None, HEADS), **kw)
        self.o_norm = GatedRMSNorm(
            head_v_dim, eps=norm_eps, norm_before_gate=True, activation="sigmoid", dtype=dtype,
            param_dtype=param_dtype,
        )
        self.o_proj = init.dense(self.value_dim, d_model, axes=(HEADS, EMBED), **kw)

    def init_cache(self, batch_size: int, max_len: int) -> RecurrentCache:
        """State [B, H, K, V] and conv state [B, W-1, 2·H·K + H·V], float32; max_len is unused."""
        check_positive(batch_size=batch_size, max_len=max_len)
        return RecurrentCache(
            state=jnp.zeros((batch_size, self.n_heads, self.head_dim, self.head_v_dim), jnp.float32),
            conv=jnp.zeros((batch_size, self.conv_size - 1, self.conv_dim), jnp.float32),
        )

    def log_decay(self, x: Hidden) -> jax.Array:
        """g [B, T, H, K] float32, the per-channel log decay of x [B, T, D]."""
        b, t, _ = x.shape
        f32 = jnp.float32
        a = self.f_b_proj(self.f_a_proj(x)).astype(f32) + self.dt_bias[...].astype(f32)
        a = a.reshape(b, t, self.n_heads, self.head_dim)
        return -jnp.exp(self.A_log[...].astype(f32))[:, None] * jax.nn.softplus(a)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: RecurrentCache | None = None
    ) -> tuple[Hidden, RecurrentCache | None]:
        """x: [B, T, D] -> ([B, T, D], the updated cache or None)."""
        b, t, _ = x.shape
        q, k, v, conv_state = conv_qkv(self, x, segment_ids, cache)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        o, state = ops.kda(
            q, k, v, self.log_decay(x), beta, scale=self.head_dim**-0.5, segment_ids=segment_ids,
            chunk_size=self.chunk_size, **recurrence_kwargs(cache, t, self.impl),
        )
        z = self.g_b_proj(self.g_a_proj(x)).reshape(b, t, self.n_heads, self.head_v_dim)
        o = self.o_norm(o, z).reshape(b, t, self.value_dim)
        new_cache = None if cache is None else RecurrentCache(state=state, conv=conv_state)
        return self.o_proj(o), new_cache
