"""Gated Linear Attention (Yang et al. 2023), as fla's ``GatedLinearAttention``, via ``ops.gla``.

Per token: q, k, v projections; a low-rank key-channel gate
  g = logsigmoid(W₂ W₁ x + b₂) / gate_logit_normalizer   ([B, T, H, K], ≤ 0),
where the normaliser (16 in the paper) keeps the decays close to 1 at initialisation; then
S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ(q_t·K^-1/2); o through RMSNorm per head and
the swish output gate, norm(o)·w·silu(g_proj(x)); o_proj.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops
from jaxlm.axis_names import EMBED, HEADS
from jaxlm.layers import initializers as init
from jaxlm.layers.cache import RecurrentCache, recurrence_kwargs
from jaxlm.layers.norms import GatedRMSNorm, RMSNorm
from jaxlm.layers.validation import check_divides, check_positive, check_positive_float
from jaxlm.typing import Hidden, SegmentIds


class GatedLinearAttention(nnx.Module):
    """GLA mixer.

    Args:
      d_model: D. n_heads: H. head_dim: K; default D // (2H) (fla's expand_k = 0.5).
      head_v_dim: V; default D // H (expand_v = 1).
      gate_low_rank_dim: rank of the gate projection. gate_logit_normalizer: divides logsigmoid.
      output_gate: the swish output gate through g_proj; without it, a plain RMSNorm per head.
      norm_eps: of the output norm. impl, chunk_size: passed to ``ops.gla``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        head_dim: int | None = None,
        head_v_dim: int | None = None,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        output_gate: bool = True,
        norm_eps: float = 1e-5,
        impl: str | None = None,
        chunk_size: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive(d_model=d_model, n_heads=n_heads, gate_low_rank_dim=gate_low_rank_dim)
        if head_dim is None:
            check_divides("d_model", d_model, "2 * n_heads", 2 * n_heads)
            head_dim = d_model // (2 * n_heads)
        if head_v_dim is None:
            check_divides("d_model", d_model, "n_heads", n_heads)
            head_v_dim = d_model // n_heads
        check_positive(head_dim=head_dim, head_v_dim=head_v_dim)
        check_positive_float(gate_logit_normalizer=gate_logit_normalizer, norm_eps=norm_eps)

        self.n_heads, self.head_dim, self.head_v_dim = n_heads, head_dim, head_v_dim
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.impl, self.chunk_size, self.dtype = impl, chunk_size, dtype
        key_dim, value_dim = n_heads * head_dim, n_heads * head_v_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = init.dense(d_model, key_dim, axes=(EMBED, HEADS), **kw)
        self.k_proj = init.dense(d_model, key_dim, axes=(EMBED, HEADS), **kw)
        self.v_proj = init.dense(d_model, value_dim, axes=(EMBED, HEADS), **kw)
        # The low-rank middle of the gate is small: every device holds it whole.
        self.gk_down = init.dense(d_model, gate_low_rank_dim, axes=(EMBED, None), **kw)
        self.gk_up = init.dense(gate_low_rank_dim, key_dim, axes=(None, HEADS), use_bias=True, **kw)
        norm_kw = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        if output_gate:
            self.g_proj = init.dense(d_model, value_dim, axes=(EMBED, HEADS), **kw)
            self.o_norm = GatedRMSNorm(head_v_dim, norm_before_gate=True, **norm_kw)
        else:
            self.g_proj = None
            self.o_norm = RMSNorm(head_v_dim, **norm_kw)
        self.o_proj = init.dense(value_dim, d_model, axes=(HEADS, EMBED), **kw)

    def init_cache(self, batch_size: int, max_len: int) -> RecurrentCache:
        """State [B, H, K, V] float32, no conv; max_len is unused."""
        check_positive(batch_size=batch_size, max_len=max_len)
        state = jnp.zeros((batch_size, self.n_heads, self.head_dim, self.head_v_dim), jnp.float32)
        return RecurrentCache(state=state, conv=None)

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: RecurrentCache | None = None
    ) -> tuple[Hidden, RecurrentCache | None]:
        """x: [B, T, D] -> ([B, T, D], the updated cache or None)."""
        b, t, _ = x.shape
        h, dk, dv = self.n_heads, self.head_dim, self.head_v_dim
        q = self.q_proj(x).reshape(b, t, h, dk)
        k = self.k_proj(x).reshape(b, t, h, dk)
        v = self.v_proj(x).reshape(b, t, h, dv)
        gk = self.gk_up(self.gk_down(x)).astype(jnp.float32).reshape(b, t, h, dk)
        gk = jax.nn.log_sigmoid(gk) / self.gate_logit_normalizer
        o, state = ops.gla(
            q, k, v, gk, segment_ids=segment_ids, chunk_size=self.chunk_size, **recurrence_kwargs(cache, t, self.impl)
        )
        if self.g_proj is not None:
            o = self.o_norm(o, self.g_proj(x).reshape(b, t, h, dv))
        else:
            o = self.o_norm(o)
        new_cache = None if cache is None else RecurrentCache(state=state, conv=None)
        return self.o_proj(o.reshape(b, t, h * dv)), new_cache
