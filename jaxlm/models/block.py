"""One decoder layer: an optional token mixer and an optional feed-forward, each a pre-norm
residual branch. The mixer and feed-forward kinds are the letters of ModelConfig's legend."""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm import layers
from jaxlm.models.config import ModelConfig
from jaxlm.ops.moe import MoEAux


def build_mixer(kind: str, config: ModelConfig, layer_idx: int, rngs: nnx.Rngs) -> nnx.Module | None:
    """The mixer layer for one letter of layer_pattern, or None for '-'. Widths and head counts
    come resolved from the config, so the layers' own defaults never apply here."""
    c = config
    dtypes = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype)
    recurrence = dict(impl=c.impl, chunk_size=c.chunk_size, **dtypes, rngs=rngs)
    if kind in "AW":
        return layers.Attention(
            c.d_model, c.n_heads, n_kv_heads=c.resolved_n_kv_heads, head_dim=c.resolved_head_dim,
            rope_theta=c.rope_theta, rotary_dim=c.resolved_rotary_dim, qk_norm=c.qk_norm,
            qk_norm_scope=c.qk_norm_scope, zero_centered_qk_norm=c.zero_centered_norm,
            output_gate=c.attention_output_gate, window=c.window if kind == "W" else None,
            norm_eps=c.norm_eps, **dtypes, rngs=rngs,
        )
    if kind == "C":
        return layers.MultiHeadLatentAttention(
            c.d_model, c.n_heads, **c.mla_dims(), q_lora_rank=c.mla_q_lora_rank, rope_theta=c.rope_theta,
            rope_layout=c.mla_rope_layout, **dtypes, rngs=rngs,
        )
    if kind == "M":
        return layers.Mamba2(
            c.d_model, d_state=c.mamba_d_state, d_conv=c.conv_size, expand=c.mamba_expand,
            head_dim=c.mamba_head_dim, n_groups=c.mamba_n_groups, norm_groups=c.resolved_mamba_norm_groups,
            n_heads=c.resolved_mamba_n_heads, conv_bias=c.mamba_conv_bias, norm_eps=c.norm_eps, **recurrence,
        )
    if kind == "-":
        return None
    heads = c.resolved_linear_n_heads
    head_dim, head_v_dim = c.linear_head_dims(kind)
    if kind in "GR":  # R: the same layer without the decay (DeltaNet)
        return layers.GatedDeltaNet(
            c.d_model, heads, head_dim=head_dim, n_v_heads=c.resolved_linear_n_v_heads, head_v_dim=head_v_dim,
            conv_size=c.conv_size, allow_neg_eigval=c.allow_neg_eigval, decay=kind == "G", norm_eps=c.norm_eps,
            **recurrence,
        )
    if kind == "K":
        return layers.KimiDeltaAttention(
            c.d_model, heads, head_dim=head_dim, head_v_dim=head_v_dim, conv_size=c.conv_size, norm_eps=c.norm_eps,
            **recurrence,
        )
    if kind == "V":
        return layers.GatedLinearAttention(
            c.d_model, heads, head_dim=head_dim, head_v_dim=head_v_dim,
            gate_low_rank_dim=c.gla_gate_low_rank_dim, norm_eps=c.norm_eps, **recurrence,
        )
    if kind == "L":
        return layers.LightningAttention(
            c.d_model, heads, head_dim=head_dim, layer_idx=layer_idx, n_layers=c.n_layers,
            norm_eps=c.resolved_lightning_norm_eps, **recurrence,
        )
    return layers.LinearAttention(  # "N"
        c.d_model, heads, head_dim=head_dim, head_v_dim=head_v_dim, norm_eps=c.norm_eps, **recurrence,
    )


def build_ffn(kind: str, config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module | None:
    """The feed-forward for one letter of ffn_pattern, or None for '-'."""
    c = config
    dtypes = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype, rngs=rngs)
    if kind == "D":
        return layers.feed_forward(c.mlp_activation, c.d_model, c.d_ff, **dtypes)
    if kind == "E":
        return layers.MoE(
            c.d_model, c.resolved_d_expert, c.n_experts, c.top_k, capacity_factor=c.capacity_factor,
            num_shared_experts=c.n_shared_experts, shared_d_ff=c.resolved_shared_d_ff,
            router=c.router, renormalize=c.renormalize, shared_expert_gate=c.shared_expert_gate,
            use_selection_bias=c.use_selection_bias, activation=c.mlp_activation, routed_scale=c.routed_scale,
            impl=c.moe_impl, **dtypes,
        )
    return None


class Block(nnx.Module):
    """x [B, T, D] -> x + mixer(norm(x)), then + ffn(norm(x)); either branch may be absent.

    With ModelConfig's residual_from_norm, residual_scale α and branch_scale β each branch is
    x <- α·r + β·f(norm(x)), r = norm(x) or x."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        mixer_kind, ffn_kind = config.layer_kinds()[layer_idx]
        self.mixer_kind, self.ffn_kind = mixer_kind, ffn_kind
        self.residual_from_norm = config.residual_from_norm
        self.scales = (float(config.residual_scale), float(config.branch_scale))
        norm = dict(
            eps=config.norm_eps, zero_centered=config.zero_centered_norm,
            dtype=config.compute_dtype, param_dtype=config.storage_dtype,
        )
        self.mixer = build_mixer(mixer_kind, config, layer_idx, rngs)
        self.mixer_norm = layers.RMSNorm(config.d_model, **norm) if self.mixer is not None else None
        self.ffn = build_ffn(ffn_kind, config, rngs)
        self.ffn_norm = layers.RMSNorm(config.d_model, **norm) if self.ffn is not None else None

    def init_cache(self, batch_size: int, max_len: int):
        """The mixer's cache, or None for a feed-forward-only layer."""
        return None if self.mixer is None else self.mixer.init_cache(batch_size, max_len)

    def __call__(
        self, x: jax.Array, *, segment_ids: jax.Array | None = None, cache=None
    ) -> tuple[jax.Array, object, MoEAux | None]:
        """Returns (x [B, T, D], the mixer's new cache or None, the MoE aux or None)."""
        new_cache, aux = None, None
        if self.mixer is not None:
            h = self.mixer_norm(x)
            y, new_cache = self.mixer(h, segment_ids=segment_ids, cache=cache)
            x = self._residual(x, h, y)
        if self.ffn is not None:
            h = self.ffn_norm(x)
            if self.ffn_kind == "E":
                y, aux = self.ffn(h)
            else:
                y = self.ffn(h)
            x = self._residual(x, h, y)
        return x, new_cache, aux

    def _residual(self, x: jax.Array, h: jax.Array, y: jax.Array) -> jax.Array:
        """α·r + β·y in x's dtype, r = x or (residual_from_norm) h = norm(x)."""
        r = h.astype(x.dtype) if self.residual_from_norm else x
        alpha, beta = self.scales
        if (alpha, beta) == (1.0, 1.0):
            return r + y.astype(x.dtype)
        return alpha * r + beta * y.astype(x.dtype)

