"""Mamba-2 (SSD) mixer, as in mamba_ssm's ``Mamba2``, computed through ``ops.simple_gla``.

Per head h with state [N, P] (N = d_state, P = head_dim):
  h_t = exp(dt_t·A) h_{t-1} + dt_t · B_t x_tᵀ,   y_t = C_tᵀ h_t + D x_t,
with dt_t = softplus(dt_raw + dt_bias) and A = −exp(A_log). That is simple GLA with
  g = dt·A,  k = B,  v = dt·x,  q = C,  scale = 1,
where the B/C groups are the q/k heads and the SSM heads the value heads (head h reads group
h // (heads/groups), as mamba_ssm repeats them).

Layer: in_proj → [z, xBC, dt]; causal depthwise conv + SiLU on xBC = [x, B, C]; SSD; D skip;
gated RMSNorm norm(y·silu(z)) over groups; out_proj.
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


class Mamba2(nnx.Module):
    """Mamba-2 mixer.

    Args:
      d_model: D. expand: d_inner = expand·D. head_dim: P, dividing d_inner; HV = d_inner / P heads.
      n_heads: HV given directly, d_inner = HV·P, expand unused (Nemotron-H's d_inner need not be
        a multiple of D); default None.
      d_state: N. n_groups: B/C groups, dividing HV. d_conv: W, the conv width.
      a_init_range: A ~ uniform(range) at init. dt_min, dt_max, dt_init_floor: dt ~ log-uniform.
      norm_eps: of the gated RMSNorm. conv_bias: a bias in the conv (mamba_ssm's default).
      norm_groups: groups the gated RMSNorm normalises separately, dividing d_inner; default
        n_groups (mamba_ssm); 1 normalises all d_inner channels together (transformers' Mamba2 before 5.24).
      impl, chunk_size: passed to ``ops.simple_gla`` for full sequences and prefill.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        a_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        conv_bias: bool = True,
        norm_groups: int | None = None,
        n_heads: int | None = None,
        impl: str | None = None,
        chunk_size: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive(
            d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, head_dim=head_dim, n_groups=n_groups
        )
        if n_heads is None:
            d_inner = expand * d_model
            check_divides("expand * d_model", d_inner, "head_dim", head_dim)
            n_heads = d_inner // head_dim
        else:
            check_positive(n_heads=n_heads)
            d_inner = n_heads * head_dim
        check_divides("n_heads", n_heads, "n_groups", n_groups)
        lo, hi = a_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"a_init_range must be (lo, hi) with 0 < lo <= hi, got {a_init_range!r}")
        check_positive_float(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, norm_eps=norm_eps)
        if dt_min > dt_max:
            raise ValueError(f"dt_min={dt_min} must be <= dt_max={dt_max}")
        norm_groups = n_groups if norm_groups is None else norm_groups
        check_positive(norm_groups=norm_groups)
        check_divides("d_inner", d_inner, "norm_groups", norm_groups)

        self.d_inner, self.d_state, self.n_groups = d_inner, d_state, n_groups
        self.n_heads, self.head_dim, self.d_conv = n_heads, head_dim, d_conv
        self.impl, self.chunk_size, self.dtype = impl, chunk_size, dtype
        self.conv_dim = d_inner + 2 * n_groups * d_state
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = init.dense(d_model, d_inner + self.conv_dim + n_heads, axes=(EMBED, HEADS), **kw)
        conv = init.conv_weight(rngs.params(), self.conv_dim, d_conv, param_dtype)
        self.conv_weight = init.param(conv, (HEADS, None))
        self.conv_bias = (
            init.param(init.conv_weight(rngs.params(), self.conv_dim, d_conv, param_dtype)[:, 0], (None,))
            if conv_bias else None
        )
        self.A_log = init.param(init.a_log_init(rngs.params(), n_heads, (lo, hi), param_dtype), (None,))
        dt_bias = init.dt_bias_init(rngs.params(), n_heads, dt_min, dt_max, dt_init_floor, param_dtype)
        self.dt_bias = init.param(dt_bias, (None,))
        self.D = init.param(jnp.ones((n_heads,), param_dtype), (None,))
        # mamba_ssm's RMSNormGated: gate first, then normalise each group of d_inner / norm_groups.
        self.norm = GatedRMSNorm(
            d_inner,
            eps=norm_eps,
            norm_before_gate=False,
            group_size=d_inner // norm_groups,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.out_proj = init.dense(d_inner, d_model, axes=(HEADS, EMBED), **kw)

    def init_cache(self, batch_size: int, max_len: int) -> RecurrentCache:
        """State [B, HV, N, P] and conv state [B, W-1, C], both float32; max_len is unused."""
        check_positive(batch_size=batch_size, max_len=max_len)
        return RecurrentCache(
            state=jnp.zeros((batch_size, self.n_heads, self.d_state, self.head_dim), jnp.float32),
            conv=jnp.zeros((batch_size, self.d_conv - 1, self.conv_dim), jnp.float32),
        )

    def __call__(
        self, x: Hidden, *, segment_ids: SegmentIds | None = None, cache: RecurrentCache | None = None
    ) -> tuple[Hidden, RecurrentCache | None]:
        """x: [B, T, D] -> ([B, T, D], the updated cache or None)."""
        b, t, _ = x.shape
        zxbcdt = self.in_proj(x)
        z, xbc, dt = jnp.split(zxbcdt, [self.d_inner, self.d_inner + self.conv_dim], axis=-1)
        xbc, conv_state = ops.causal_conv1d(
            xbc,
            self.conv_weight[...].astype(self.dtype),
            None if self.conv_bias is None else self.conv_bias[...].astype(self.dtype),
            activation="silu",
            initial_state=None if cache is None else cache.conv,
            output_final_state=cache is not None,
            segment_ids=segment_ids,
        )
        gn = self.n_groups * self.d_state
        xs, bs, cs = jnp.split(xbc, [self.d_inner, self.d_inner + gn], axis=-1)
        xs = xs.reshape(b, t, self.n_heads, self.head_dim)
        bs = bs.reshape(b, t, self.n_groups, self.d_state)
        cs = cs.reshape(b, t, self.n_groups, self.d_state)

        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))  # [B, T, HV]
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))  # [HV]
        v = (xs.astype(jnp.float32) * dt[..., None]).astype(self.dtype)
        y, state = ops.simple_gla(
            cs,
            bs,
            v,
            dt * a,
            scale=1.0,
            segment_ids=segment_ids,
            chunk_size=self.chunk_size,
            **recurrence_kwargs(cache, t, self.impl),
        )
        y = y.astype(jnp.float32) + self.D[...].astype(jnp.float32)[:, None] * xs.astype(jnp.float32)
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        new_cache = None if cache is None else RecurrentCache(state=state, conv=conv_state)
        return self.out_proj(y), new_cache
