"""Model FLOPs per token: the numerator of MFU, from the config alone.

A multiply-add is 2 FLOPs. Per token, the forward pass counts:

  dense_matmuls      2 × the matmul weights a token passes through: every mixer's projections,
                     dense SwiGLUs (3·D·F), and for MoE layers the router (D·E), the top_k routed
                     experts (top_k·3·D·F_e), the shared experts (3·D·S) and their gate (D).
  conv               2·W·channels: the depthwise causal convs of (Gated) DeltaNet, KDA and Mamba-2.
  head               2·D·vocab: the output head, tied or not. The input embedding is a lookup: 0.
  attention_mixing   per softmax layer 2·H·(K + V)·ctx (MLA: K = Kn + P, its keys and values
                     expanded per head, the form training runs): the scores q·k and the weighted sum of
                     values over a context ctx averaged over the sequence: (T + 1)/2 causal, or
                     mean_t min(window, t) for sliding-window layers (only the causal triangle:
                     a dense kernel that computes the masked half does work the model does not need).
  recurrence_mixing  the chunk form, per value head with key width K, value width V and the chunk
                     C actually run, min(config.chunk_size or its default, the power of two at or
                     above T; ops.sequence.default_chunk_size); the
                     C×C intra-chunk blocks count whole, as the chunk form runs them (padding to
                     whole chunks does not count):
    scalar gate (Mamba-2, Lightning, linear attention)  4KV + 2C(K + V):
                     state update Σ k vᵀ (2KV), readout qᵀS (2KV), intra-chunk q·k and its
                     weighted sum of values (2C(K + V)). Mamba-2: K = d_state, V = head_dim,
                     heads = expand·D / head_dim (its B/C groups are shared by those heads);
                     linear attention: V + 1 (the normaliser's column of ones).
    GLA (vector gate)  the scalar terms + S(3K + 2V): the S×S diagonal sub-chunks, S =
                     min(16, C), with the per-channel decay tensor, q⊙k⊙decay summed over K, times V.
    (Gated) DeltaNet 6KV + 2CK + 4C(K + V) + C²/3: the scalar terms, plus the WY/UT transform:
                     K Kᵀ within the chunk (2CK), the unit-triangular inverse (C³/3 a chunk),
                     applying it to [K | V] (2C(K + V)) and U = U' − W S (2KV).
                     KDA counts the same: its per-channel decay scales q and k elementwise.

Elementwise work (norms, activations, gates, softmax exponentials, RoPE) is not counted, as in
the usual 6N-style model FLOPs. Training is 3 × forward (the backward pass is two matmuls for
each forward one); rematerialisation is hardware work, not model work, and is not counted.
"""

from __future__ import annotations

import numbers

from jaxlm.models.config import ModelConfig
from jaxlm.ops.channel_scores import SUB_CHUNK
from jaxlm.ops.sequence import default_chunk_size, effective_chunk_size

COMPONENTS = ("dense_matmuls", "conv", "head", "attention_mixing", "recurrence_mixing")


def mean_attention_context(seq_len: int, window: int | None = None) -> float:
    """Keys a causal query sees, averaged over positions 1..T: mean_t min(window, t)."""
    seq_len = _check_seq_len(seq_len)
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def scalar_chunk_flops(k: int, v: int, chunk: int) -> float:
    """Per token and value head: the scalar-gate chunk form, 4KV + 2C(K + V)."""
    return 4 * k * v + 2 * chunk * (k + v)


def vector_chunk_flops(k: int, v: int, chunk: int) -> float:
    """Per token and value head: GLA's chunk form, the scalar terms + S(3K + 2V)."""
    sub = min(SUB_CHUNK, chunk)
    return scalar_chunk_flops(k, v, chunk) + sub * (3 * k + 2 * v)


def delta_chunk_flops(k: int, v: int, chunk: int) -> float:
    """Per token and value head: the gated delta rule's chunk form with its WY/UT transform,
    6KV + 2CK + 4C(K + V) + C²/3."""
    return 6 * k * v + 2 * chunk * k + 4 * chunk * (k + v) + chunk * chunk / 3


def _mixer(kind: str, c: ModelConfig, seq_len: int) -> tuple[int, int, float, float]:
    """(projection weights, conv weights, attention FLOPs, recurrence FLOPs) per token of one mixer."""
    d = c.d_model
    chunk = effective_chunk_size(default_chunk_size(c.chunk_size, kda_chunk_form=kind == "K"), seq_len)
    if kind in "AW":
        h, hk, hd = c.n_heads, c.resolved_n_kv_heads, c.resolved_head_dim
        proj = d * h * hd + 2 * d * hk * hd + h * hd * d + (d * h * hd if c.attention_output_gate else 0)
        ctx = mean_attention_context(seq_len, c.window if kind == "W" else None)
        return proj, 0, 2 * h * (hd + hd) * ctx, 0.0
    if kind == "C":
        h, m, r_q = c.n_heads, c.mla_dims(), c.mla_q_lora_rank
        r, kn, p, v = m["kv_lora_rank"], m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"]
        q = d * h * (kn + p) if r_q is None else d * r_q + r_q * h * (kn + p)
        proj = q + d * (r + p) + r * h * (kn + v) + h * v * d  # q, kv_a, kv_b (every token's k, v), o
        ctx = mean_attention_context(seq_len)
        return proj, 0, 2 * h * (kn + p + v) * ctx, 0.0
    if kind == "M":
        heads, d_inner = c.resolved_mamba_n_heads, c.mamba_d_inner
        conv_dim = d_inner + 2 * c.mamba_n_groups * c.mamba_d_state
        proj = d * (d_inner + conv_dim + heads) + d_inner * d  # in_proj [z, xBC, dt], out_proj
        mixing = heads * scalar_chunk_flops(c.mamba_d_state, c.mamba_head_dim, chunk)
        return proj, c.conv_size * conv_dim, 0.0, mixing
    if kind == "-":
        return 0, 0, 0.0, 0.0
    h = c.resolved_linear_n_heads
    k, v = c.linear_head_dims(kind)
    if kind in "GR":
        hv = c.resolved_linear_n_v_heads
        # q, k, v, a (decay; Gated DeltaNet only), b (beta), g (output gate), o.
        gates = 2 if kind == "G" else 1
        proj = 2 * d * h * k + d * hv * v + gates * d * hv + d * hv * v + hv * v * d
        return proj, c.conv_size * (2 * h * k + hv * v), 0.0, hv * delta_chunk_flops(k, v, chunk)
    if kind == "K":
        # q, k, v, the low-rank decay (rank K), b (beta), the low-rank output gate (rank K), o.
        proj = 2 * d * h * k + d * h * v + (d * k + k * h * k) + d * h + (d * k + k * h * v) + h * v * d
        return proj, c.conv_size * (2 * h * k + h * v), 0.0, h * delta_chunk_flops(k, v, chunk)
    if kind == "V":
        r = c.gla_gate_low_rank_dim
        # q, k, v, the low-rank gate, g (output gate), o.
        proj = 2 * d * h * k + d * h * v + (d * r + r * h * k) + d * h * v + h * v * d
        return proj, 0, 0.0, h * vector_chunk_flops(k, v, chunk)
    if kind == "L":
        proj = 4 * d * h * k + h * k * d  # q, k, v, output gate, out
        return proj, 0, 0.0, h * scalar_chunk_flops(k, k, chunk)
    # "N"
    proj = 2 * d * h * k + d * h * v + h * v * d
    return proj, 0, 0.0, h * scalar_chunk_flops(k, v + 1, chunk)


def _ffn_weights(kind: str, c: ModelConfig) -> int:
    """Matmul weights one token passes through in a feed-forward: only its active experts."""
    d = c.d_model
    matrices = 2 if c.mlp_activation == "relu2" else 3  # relu2 is ungated: up and down only
    if kind == "D":
        return matrices * d * c.d_ff
    if kind == "E":
        shared = c.n_shared_experts * c.resolved_shared_d_ff
        gate = d if c.shared_expert_gate and c.n_shared_experts else 0
        return d * c.n_experts + c.top_k * matrices * d * c.resolved_d_expert + matrices * d * shared + gate
    return 0


def flops_breakdown(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component (see the module docstring), for sequences of seq_len."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a jaxlm.models.ModelConfig, got {type(config).__name__}")
    seq_len = _check_seq_len(seq_len)
    out = dict.fromkeys(COMPONENTS, 0.0)
    for mixer_kind, ffn_kind in config.layer_kinds():
        proj, conv, attention, recurrence = _mixer(mixer_kind, config, seq_len)
        out["dense_matmuls"] += 2.0 * (proj + _ffn_weights(ffn_kind, config))
        out["conv"] += 2.0 * conv
        out["attention_mixing"] += attention
        out["recurrence_mixing"] += recurrence
    out["head"] = 2.0 * config.d_model * config.vocab_size
    return out


def flops_per_token(config: ModelConfig, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token for sequences of seq_len tokens: the forward pass, ×3 when training."""
    forward = sum(flops_breakdown(config, seq_len).values())
    return 3.0 * forward if training else forward


def _check_seq_len(seq_len: object) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int (tokens per sequence), got {seq_len!r}")
    return int(seq_len)
