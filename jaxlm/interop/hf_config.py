"""What every Hugging Face architecture mapping shares: the ``Architecture`` record, reading
and checking HF ``config.json`` fields, and the rules for the parts most models have
(embedding and head, final norm, attention, SwiGLU MLP, routed experts).

Each architecture module provides three functions:
  ``to_config(hf: dict) -> ModelConfig`` (ValueError on an option jaxlm cannot express),
  ``from_config(config) -> dict`` (the HF config.json fields; ValueError when the jaxlm config
  is not of this architecture), and ``rules(config) -> list[Rule]`` (the tensor mapping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from jaxlm.interop.hf_tensors import Rule, linear, same, stacked_linear
from jaxlm.models import ModelConfig


@dataclass(frozen=True)
class Architecture:
    name: str  # the HF class, e.g. "LlamaForCausalLM"
    model_type: str  # config.json's model_type
    to_config: Callable[[dict], ModelConfig]
    from_config: Callable[[ModelConfig], dict]
    rules: Callable[[ModelConfig], list[Rule]]
    ignored: tuple[str, ...] = ()  # regexes of checkpoint tensors transformers ignores or derives from the config
    # (regex, replacement) pairs giving other checkpoints' spellings of a tensor the name the rules use
    # (Moonshot's Kimi Linear keeps dense MLPs under mlp., transformers writes block_sparse_moe.)
    renames: tuple[tuple[str, str], ...] = ()


def unsupported(arch: str, what: str, supported: str) -> ValueError:
    return ValueError(f"{arch}: {what} is not supported; supported: {supported}")


def expect(hf: dict, arch: str, key: str, default: Any, allowed: tuple) -> Any:
    """hf[key] (or default), which must be one of ``allowed``."""
    value = hf.get(key, default)
    if value not in allowed:
        raise unsupported(arch, f"config {key}={value!r}", " or ".join(repr(a) for a in allowed))
    return value


def need(condition: bool, arch: str, what: str) -> None:
    """For saving: the jaxlm config must have ``what`` to be written as ``arch``."""
    if not condition:
        raise ValueError(f"this model is not a {arch}: {arch} needs {what}")


def need_plain_blocks(config: ModelConfig, arch: str, activation: str = "swiglu") -> None:
    """For saving: pre-norm residuals x + f(norm(x)), ``activation`` feed-forwards, unscaled experts."""
    need(not config.residual_from_norm and (config.residual_scale, config.branch_scale) == (1.0, 1.0), arch,
         "pre-norm residuals x + f(norm(x)) (no residual_from_norm, residual_scale or branch_scale)")
    need(config.mlp_activation == activation, arch, f"mlp_activation={activation!r}")
    if any(f == "E" for _, f in config.layer_kinds()):
        need(config.capacity_factor is None, arch, "dropless experts (capacity_factor None)")
        if activation == "swiglu":
            need(config.routed_scale == 1.0, arch, "routed_scale 1")


def as_float(value: Any) -> float:
    """A JSON number, or transformers' {"__float__": "Infinity"} encoding of a non-finite one."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def rope(hf: dict, arch: str, head_dim: int, partial: bool = False) -> dict:
    """ModelConfig's rope_theta and rotary_dim from rope_parameters (transformers 5) or the
    legacy rope_theta / rope_scaling / partial_rotary_factor fields. Only plain RoPE is supported;
    a partial_rotary_factor only where the architecture applies it (``partial``: Qwen3-Next)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise unsupported(arch, f"rope scaling {kind!r}", "plain RoPE (rope_type 'default')")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0 and not partial:
        raise unsupported(arch, f"partial_rotary_factor={factor} (transformers' {arch} rotates the whole head)",
                          "partial_rotary_factor 1.0")
    rotary_dim = int(head_dim * factor)
    if rotary_dim % 2:
        raise unsupported(arch, f"partial_rotary_factor={factor} (rotating {rotary_dim} channels)", "an even count")
    return dict(rope_theta=float(theta), rotary_dim=None if rotary_dim == head_dim else rotary_dim)


def rope_fields(config: ModelConfig) -> dict:
    """The inverse of ``rope``: both the transformers 5 and the legacy spelling."""
    factor = config.resolved_rotary_dim / config.resolved_head_dim
    params = {"rope_type": "default", "rope_theta": config.rope_theta}
    extra = {}
    if factor != 1.0:
        params["partial_rotary_factor"] = factor
        extra["partial_rotary_factor"] = factor
    return {"rope_parameters": params, "rope_theta": config.rope_theta, **extra}


def attention_fields(hf: dict, arch: str, partial_rotary: bool = False) -> dict:
    """Heads, widths and RoPE (see ``rope``) of softmax attention; attention_bias and non-SiLU
    MLPs are refused."""
    expect(hf, arch, "attention_bias", False, (False,))
    expect(hf, arch, "mlp_bias", False, (False,))
    expect(hf, arch, "hidden_act", "silu", ("silu",))
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    return dict(
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        **rope(hf, arch, head_dim, partial_rotary),
    )


def common_fields(hf: dict, eps_key: str = "rms_norm_eps") -> dict:
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        norm_eps=float(hf.get(eps_key, 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def common_hf_fields(config: ModelConfig, arch: str, model_type: str, eps_key: str = "rms_norm_eps") -> dict:
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        eps_key: config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
    }


def attention_hf_fields(config: ModelConfig) -> dict:
    return {
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.resolved_n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        **rope_fields(config),
    }


def periodic(pattern: str) -> str:
    """The shortest string that, cycled, gives ``pattern`` (ModelConfig cycles its patterns)."""
    for p in range(1, len(pattern) + 1):
        if all(c == pattern[i % p] for i, c in enumerate(pattern)):
            return pattern[:p]
    return pattern


def window_fields(hf: dict, arch: str, layer_types: list[str]) -> tuple[str, dict]:
    """Per-layer 'A' (full) or 'W' (sliding window) letters from HF layer_types and sliding_window."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    letters = []
    for kind in layer_types:
        if kind not in ("full_attention", "sliding_attention"):
            raise unsupported(arch, f"layer type {kind!r}", "'full_attention' and 'sliding_attention'")
        letters.append("W" if kind == "sliding_attention" and window else "A")
    return "".join(letters), ({"window": int(window)} if "W" in letters else {})


def embedding_rules(config: ModelConfig, embed: str, head: str = "lm_head.weight") -> list[Rule]:
    rules = [same(embed, "embed.embedding")]
    if not config.tie_embeddings:
        rules.append(linear(head, "embed.head"))  # lm_head.weight [N, D] <-> head [D, N]
    return rules


def block_norm_rules(hf: str, jx: str) -> list[Rule]:
    """A decoder layer's two RMSNorm weights: before its mixer and before its feed-forward."""
    return [same(f"{hf}.input_layernorm.weight", f"{jx}.mixer_norm.weight"),
            same(f"{hf}.post_attention_layernorm.weight", f"{jx}.ffn_norm.weight")]


def attention_rules(hf: str, jx: str, config: ModelConfig) -> list[Rule]:
    """q/k/v/o projections and the optional QK norms of one attention layer."""
    rules = [linear(f"{hf}.{p}.weight", f"{jx}.{p}.kernel") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if config.qk_norm:
        rules += [same(f"{hf}.{n}.weight", f"{jx}.{n}.weight") for n in ("q_norm", "k_norm")]
    return rules


def mlp_rules(hf: str, jx: str, names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """A SwiGLU MLP; ``names`` are the HF names of its gate, up and down projections."""
    params = ("gate_proj", "up_proj", "down_proj")
    return [linear(f"{hf}.{n}.weight", f"{jx}.{j}.kernel") for n, j in zip(names, params)]


def expert_rules(hf: str, jx: str, n_experts: int, names: tuple[str, str, str], router: str = "gate") -> list[Rule]:
    """Router ``{hf}.{router}.weight [E, D]`` and per-expert SwiGLU weights
    ``{hf}.experts.{e}.{name}.weight`` stacked into w_gate, w_up [E, D, F] and w_down [E, F, D]."""
    rules = [linear(f"{hf}.{router}.weight", f"{jx}.router.kernel")]
    for name, param in zip(names, ("w_gate", "w_up", "w_down")):
        rules.append(stacked_linear([f"{hf}.experts.{e}.{name}.weight" for e in range(n_experts)], f"{jx}.{param}"))
    return rules


def check_int(value: Any, arch: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != math.floor(value) or value <= 0:
        raise unsupported(arch, f"config {key}={value!r}", "a positive integer")
    return int(value)


def moe_pattern(hf: dict) -> str:
    """'E' or 'D' per layer from num_experts, decoder_sparse_step and mlp_only_layers (Qwen-MoE)."""
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    sparse = num_experts(hf) > 0
    n = hf["num_hidden_layers"]
    return "".join("E" if sparse and i not in dense and (i + 1) % step == 0 else "D" for i in range(n))


def num_experts(hf: dict) -> int:
    """Routed experts: ``num_experts``, spelt ``num_local_experts`` by some configs (Qwen3Moe in transformers 5)."""
    return int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)
