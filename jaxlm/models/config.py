"""ModelConfig: everything that defines a decoder LM, as one flat, JSON-able dataclass.

Layer patterns. ``layer_pattern`` names each layer's token mixer and ``ffn_pattern`` its
feed-forward, one character per layer. Each string is cycled over ``n_layers``, so ``"GGGA"``
with 8 layers is G G G A G G G A.

  mixer  A  softmax attention (RoPE, GQA; options: qk_norm and its scope, attention_output_gate)
         W  sliding-window softmax attention, ``window`` tokens
         C  multi-head latent attention (MLA: DeepSeek-V3, Kimi Linear), its cache the compressed
            latent; widths ``mla_dims``, RoPE layout ``mla_rope_layout`` (None: NoPE, as Kimi Linear)
         G  Gated DeltaNet
         R  DeltaNet: the delta rule without Gated DeltaNet's decay, otherwise the same layer
         K  Kimi Delta Attention: Gated DeltaNet with a decay per key channel (Kimi Linear)
         M  Mamba-2
         V  GLA (vector-gated linear attention)
         L  Lightning attention (MiniMax)
         N  plain linear attention
         -  none: the layer is a feed-forward block only
  ffn    D  dense MLP of width d_ff (SwiGLU; mlp_activation="relu2": Nemotron-H's relu(up(x))²)
         E  Mixture-of-Experts (n_experts routed experts of width d_expert, top_k each, with the
            same activation; routed_scale multiplies their output)
         -  none: the layer is a mixer block only

A layer with both a mixer and a feed-forward is a pre-norm block x += mixer(norm(x));
x += ffn(norm(x)). A layer with one of them has one residual branch, as in Nemotron-H, whose
Mamba, attention, MLP and MoE layers each stand alone. Each branch is in general
x ← α·r + β·f(norm(x)) with r = x, or r = norm(x) with ``residual_from_norm`` (MiniMax-01's
post-norm); α = residual_scale and β = branch_scale (DeepNorm), both 1 by default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

import jax.numpy as jnp

from jaxlm.layers.attention import QK_NORM_SCOPES
from jaxlm.layers.mla import ROPE_LAYOUTS as MLA_ROPE_LAYOUTS
from jaxlm.layers.mlp import ACTIVATIONS as MLP_ACTIVATIONS
from jaxlm.ops.moe import ROUTERS

MIXERS = {
    "A": "softmax attention",
    "W": "sliding-window softmax attention",
    "C": "multi-head latent attention",
    "G": "Gated DeltaNet",
    "R": "DeltaNet",
    "K": "Kimi Delta Attention",
    "M": "Mamba-2",
    "V": "GLA",
    "L": "Lightning attention",
    "N": "linear attention",
    "-": "none",
}
FFNS = {"D": "dense MLP", "E": "Mixture-of-Experts", "-": "none"}
LINEAR_MIXERS = "GRKVLN"  # the mixers whose widths are linear_head_dim and linear_head_v_dim
# The names of the dtypes a model computes and stores its parameters in: ModelConfig turns them
# into jnp dtypes (compute_dtype, storage_dtype) for the layers.
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM. Fields that a pattern does not use are ignored (e.g. the MoE fields
    without an ``E`` in ffn_pattern). ``None`` for a width means the default derived from others; read widths through the
    ``resolved_*`` properties and ``linear_head_dims``, which apply those defaults."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    layer_pattern: str = "A"
    ffn_pattern: str = "D"
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    zero_centered_norm: bool = False  # Qwen3-Next: norm weights stored as offsets from 1
    residual_from_norm: bool = False  # MiniMax-01: each branch adds to norm(x) instead of x
    residual_scale: float = 1.0  # α in x <- α·residual + β·branch (DeepNorm's α, MiniMax-01)
    branch_scale: float = 1.0  # β

    # Softmax attention (A, W).
    n_heads: int = 4
    n_kv_heads: int | None = None  # default n_heads
    head_dim: int | None = None  # default d_model // n_heads
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # channels rotated per head; default head_dim; 0: no RoPE (Nemotron-H)
    qk_norm: bool = False
    # "head": each head's channels (Qwen3); "all": the whole q and k projections (OLMoE)
    qk_norm_scope: Literal[QK_NORM_SCOPES] = "head"
    attention_output_gate: bool = False
    window: int = 512

    # Multi-head latent attention (C): n_heads heads; widths default from head_dim (mla_dims).
    mla_kv_lora_rank: int | None = None  # R, the cached latent; default 2·head_dim
    mla_q_lora_rank: int | None = None  # None: a plain q_proj; else q_a_proj -> norm -> q_b_proj of this rank
    mla_qk_nope_head_dim: int | None = None  # default head_dim
    mla_qk_rope_head_dim: int | None = None  # the shared rotary key; default head_dim // 2; 0: none
    mla_v_head_dim: int | None = None  # default head_dim
    mla_rope_layout: Literal[MLA_ROPE_LAYOUTS] = "half"  # "interleaved" (DeepSeek-V3), "half", None (NoPE)

    # Linear mixers (G, R, K, V, L, N): query/key heads, value heads and their widths.
    linear_n_heads: int | None = None  # default n_heads
    linear_head_dim: int | None = None  # default d_model // linear_n_heads; GLA: d_model // (2·linear_n_heads)
    linear_n_v_heads: int | None = None  # (Gated) DeltaNet's grouped value heads; default linear_n_heads
    # default linear_head_dim; GLA: d_model // linear_n_heads; Lightning: always linear_head_dim
    linear_head_v_dim: int | None = None
    conv_size: int = 4
    allow_neg_eigval: bool = False
    gla_gate_low_rank_dim: int = 16
    lightning_norm_eps: float | None = None  # Lightning attention's output RMSNorm; default norm_eps

    # Mamba-2 (M).
    mamba_d_state: int = 64
    mamba_expand: int = 2
    mamba_head_dim: int = 64
    mamba_n_groups: int = 1
    mamba_n_heads: int | None = None  # SSM heads; default mamba_expand·d_model / mamba_head_dim
    mamba_norm_groups: int | None = None  # groups of the gated output norm; default mamba_n_groups (1: all channels together)
    mamba_conv_bias: bool = True

    # Feed-forward (D, E).
    mlp_activation: Literal[MLP_ACTIVATIONS] = "swiglu"  # of every feed-forward; "relu2": ungated (Nemotron-H)
    d_ff: int = 512
    n_experts: int = 8
    top_k: int = 2
    d_expert: int | None = None  # default d_ff
    n_shared_experts: int = 0
    shared_d_ff: int | None = None  # default d_expert
    shared_expert_gate: bool = False
    router: Literal[ROUTERS] = "softmax_topk"
    renormalize: bool = False
    use_selection_bias: bool = False
    capacity_factor: float | None = None  # None: dropless
    routed_scale: float = 1.0  # multiplies the routed experts' output (routed_scaling_factor)

    # Execution.
    impl: str | None = None  # recurrence form for full sequences and prefill; None: the fastest
    chunk_size: int | None = None  # None: each op's default (ops.sequence.default_chunk_size)
    moe_impl: str | None = None
    dtype: Literal[DTYPES] = "float32"  # compute
    param_dtype: Literal[DTYPES] = "float32"  # storage
    remat: bool = False  # recompute each layer's activations in the backward pass

    def __post_init__(self) -> None:
        _check(self)

    def layer_kinds(self) -> list[tuple[str, str]]:
        """[(mixer, ffn)] per layer, the patterns cycled over n_layers."""
        lp, fp = self.layer_pattern, self.ffn_pattern
        return [(lp[i % len(lp)], fp[i % len(fp)]) for i in range(self.n_layers)]

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    # Resolved widths and head counts: the ``None`` defaults of the fields above, computed here
    # once for the layers (block.py), the FLOPs formula (flops.py) and the checkpoint mappings.
    # A default that does not divide evenly is a ValueError naming the fields.

    @property
    def resolved_n_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        if self.head_dim is not None:
            return self.head_dim
        return _quotient(self.d_model, "d_model", self.n_heads, "n_heads", "head_dim")

    @property
    def resolved_rotary_dim(self) -> int:
        return self.resolved_head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def resolved_linear_n_heads(self) -> int:
        return self.n_heads if self.linear_n_heads is None else self.linear_n_heads

    @property
    def resolved_linear_n_v_heads(self) -> int:
        """(Gated) DeltaNet's value heads (the other linear mixers have one per query/key head)."""
        return self.resolved_linear_n_heads if self.linear_n_v_heads is None else self.linear_n_v_heads

    def mla_dims(self) -> dict[str, int]:
        """Multi-head latent attention's widths: kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim
        and v_head_dim, as the layer takes them."""
        hd = self.resolved_head_dim
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return dict(
            kv_lora_rank=pick(self.mla_kv_lora_rank, 2 * hd), qk_nope_head_dim=pick(self.mla_qk_nope_head_dim, hd),
            qk_rope_head_dim=pick(self.mla_qk_rope_head_dim, hd // 2), v_head_dim=pick(self.mla_v_head_dim, hd),
        )

    def linear_head_dims(self, mixer: str) -> tuple[int, int]:
        """(K, V), the key and value head widths of the linear mixer ``mixer`` (G, R, K, V, L or N)."""
        if mixer not in LINEAR_MIXERS:
            raise ValueError(f"mixer must be one of the linear mixers {list(LINEAR_MIXERS)}, got {mixer!r}")
        h, d = self.resolved_linear_n_heads, self.d_model
        k, v = self.linear_head_dim, self.linear_head_v_dim
        if mixer == "V":  # fla's GLA: expand_k = 0.5, expand_v = 1
            k = _quotient(d, "d_model", 2 * h, "2·linear_n_heads", "linear_head_dim") if k is None else k
            v = _quotient(d, "d_model", h, "linear_n_heads", "linear_head_v_dim") if v is None else v
            return k, v
        k = _quotient(d, "d_model", h, "linear_n_heads", "linear_head_dim") if k is None else k
        if mixer == "L":  # Lightning attention's values are as wide as its keys
            return k, k
        return k, k if v is None else v

    @property
    def resolved_mamba_n_heads(self) -> int:
        if self.mamba_n_heads is not None:
            return self.mamba_n_heads
        return _quotient(
            self.mamba_expand * self.d_model, "mamba_expand·d_model", self.mamba_head_dim, "mamba_head_dim",
            "mamba_n_heads",
        )

    @property
    def mamba_d_inner(self) -> int:
        """Mamba-2's inner width: its heads times mamba_head_dim (mamba_expand·d_model by default)."""
        return self.resolved_mamba_n_heads * self.mamba_head_dim

    @property
    def resolved_mamba_norm_groups(self) -> int:
        return self.mamba_n_groups if self.mamba_norm_groups is None else self.mamba_norm_groups

    @property
    def resolved_lightning_norm_eps(self) -> float:
        return self.norm_eps if self.lightning_norm_eps is None else self.lightning_norm_eps

    @property
    def resolved_d_expert(self) -> int:
        return self.d_ff if self.d_expert is None else self.d_expert

    @property
    def resolved_shared_d_ff(self) -> int:
        return self.resolved_d_expert if self.shared_d_ff is None else self.shared_d_ff

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with some fields changed; an unknown field is a ValueError listing the fields."""
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; the fields are {field_names()}")
        return dataclasses.replace(self, **overrides)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        fields = json.loads(text)
        return cls().replace(**fields)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def _quotient(total: int, total_name: str, parts: int, parts_name: str, field: str) -> int:
    """total / parts, the default of ``field``; a ValueError when parts does not divide total."""
    if total % parts:
        raise ValueError(
            f"ModelConfig.{total_name}={total} must be a multiple of {parts_name}={parts} "
            f"when {field} is None (its default is their quotient)"
        )
    return total // parts


def _positive_ints(config: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")


def _optional_positive_ints(config: ModelConfig, *names: str) -> None:
    _positive_ints(config, *(n for n in names if getattr(config, n) is not None))


def _check_pattern(name: str, pattern: Any, legend: dict[str, str]) -> None:
    if not isinstance(pattern, str) or not pattern or any(c not in legend for c in pattern):
        choices = ", ".join(f"{k} = {v}" for k, v in legend.items())
        raise ValueError(f"ModelConfig.{name} must be a non-empty string of [{choices}], got {pattern!r}")


def _check(config: ModelConfig) -> None:
    _positive_ints(config, "vocab_size", "d_model", "n_layers", "n_heads", "window", "conv_size")
    _positive_ints(config, "gla_gate_low_rank_dim", "mamba_d_state", "mamba_expand", "mamba_head_dim")
    _positive_ints(config, "mamba_n_groups", "d_ff", "n_experts", "top_k")
    _optional_positive_ints(
        config, "chunk_size", "n_kv_heads", "head_dim", "linear_n_heads", "linear_head_dim",
        "linear_n_v_heads", "linear_head_v_dim", "d_expert", "shared_d_ff", "mamba_norm_groups",
        "mamba_n_heads", "mla_kv_lora_rank", "mla_q_lora_rank", "mla_qk_nope_head_dim", "mla_v_head_dim",
    )
    rope = config.mla_qk_rope_head_dim
    if rope is not None and (isinstance(rope, bool) or not isinstance(rope, int) or rope < 0):
        raise ValueError(f"ModelConfig.mla_qk_rope_head_dim must be None or an int >= 0, got {rope!r}")
    if config.mla_rope_layout not in MLA_ROPE_LAYOUTS:
        raise ValueError(
            f"ModelConfig.mla_rope_layout must be one of {list(MLA_ROPE_LAYOUTS)}, got {config.mla_rope_layout!r}"
        )
    if "C" in config.layer_pattern and config.mla_rope_layout is not None and config.mla_dims()["qk_rope_head_dim"] % 2:
        raise ValueError(
            f"ModelConfig.mla_qk_rope_head_dim={config.mla_dims()['qk_rope_head_dim']} must be even for RoPE "
            f"(mla_rope_layout={config.mla_rope_layout!r}); set mla_rope_layout=None for NoPE"
        )
    _check_pattern("layer_pattern", config.layer_pattern, MIXERS)
    _check_pattern("ffn_pattern", config.ffn_pattern, FFNS)
    empty = [i for i, kinds in enumerate(config.layer_kinds()) if kinds == ("-", "-")]
    if empty:
        raise ValueError(
            f"layers {empty} have neither a mixer nor a feed-forward: layer_pattern "
            f"{config.layer_pattern!r} and ffn_pattern {config.ffn_pattern!r} put '-' at the same place"
        )
    for name in ("dtype", "param_dtype"):
        if getattr(config, name) not in DTYPES:
            raise ValueError(f"ModelConfig.{name} must be one of {list(DTYPES)}, got {getattr(config, name)!r}")
    if config.lightning_norm_eps is not None and not (
        isinstance(config.lightning_norm_eps, (int, float)) and 0 < config.lightning_norm_eps < float("inf")
    ):
        raise ValueError(f"ModelConfig.lightning_norm_eps must be None or positive, got {config.lightning_norm_eps!r}")
    rotary_dim = config.rotary_dim
    if rotary_dim is not None and (isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 0):
        raise ValueError(f"ModelConfig.rotary_dim must be None or an int >= 0, got {config.rotary_dim!r}")
    if config.mlp_activation not in MLP_ACTIVATIONS:
        raise ValueError(
            f"ModelConfig.mlp_activation must be one of {list(MLP_ACTIVATIONS)}, got {config.mlp_activation!r}"
        )
    if config.qk_norm_scope not in QK_NORM_SCOPES:
        raise ValueError(
            f"ModelConfig.qk_norm_scope must be one of {list(QK_NORM_SCOPES)}, got {config.qk_norm_scope!r}"
        )
    if config.router not in ROUTERS:
        raise ValueError(f"ModelConfig.router must be one of {list(ROUTERS)}, got {config.router!r}")
    if config.top_k > config.n_experts:
        raise ValueError(f"ModelConfig.top_k={config.top_k} must be <= n_experts={config.n_experts}")
    if isinstance(config.n_shared_experts, bool) or not isinstance(config.n_shared_experts, int) or config.n_shared_experts < 0:
        raise ValueError(f"ModelConfig.n_shared_experts must be an int >= 0, got {config.n_shared_experts!r}")
    for name in ("norm_eps", "rope_theta", "routed_scale", "residual_scale", "branch_scale"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
