"""Softmax-attention transformers: LlamaForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM,
Qwen3MoeForCausalLM and OlmoeForCausalLM.

All five are pre-norm blocks of RMSNorm, attention (RoPE, GQA) and a SwiGLU MLP or routed
SwiGLU experts under ``model.layers.{i}``. What differs:
  Llama     dense MLP;
  Qwen3     RMSNorm over each head of q and k; optional sliding-window layers (layer_types);
  Mixtral   experts w1 (gate), w3 (up), w2 (down) under block_sparse_moe; softmax, top-k, renormalise;
  Qwen3Moe  Qwen3's attention; experts with softmax then top-k, renormalised if norm_topk_prob;
            dense layers where mlp_only_layers or decoder_sparse_step say so;
  OLMoE     RMSNorm over the whole q and k projections (qk_norm_scope "all"); experts as Qwen3Moe.
"""

from __future__ import annotations

from jaxlm.interop.hf_config import (
    Architecture, attention_fields, attention_hf_fields, attention_rules, block_norm_rules, check_int,
    common_fields, common_hf_fields, embedding_rules, expert_rules, mlp_rules, moe_pattern, need, need_plain_blocks,
    num_experts, periodic, unsupported, window_fields,
)
from jaxlm.interop.hf_tensors import Rule, same
from jaxlm.models import ModelConfig


def _base(hf: dict, arch: str) -> dict:
    return dict(n_layers=check_int(hf["num_hidden_layers"], arch, "num_hidden_layers"),
                **common_fields(hf), **attention_fields(hf, arch))


def _global_window(hf: dict) -> tuple[str, dict]:
    """'W' for every layer when the model has a sliding_window (Mixtral, Qwen3Moe), else 'A'."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return ("W", {"window": int(window)}) if window else ("A", {})


def _check_attention(config: ModelConfig, arch: str, qk_norm: bool, scope: str = "head", windows: bool = False) -> None:
    letters = {m for m, _ in config.layer_kinds()}
    need(letters <= ({"A", "W"} if windows else {"A"}), arch,
         "softmax attention in every layer" + (" (full or sliding-window)" if windows else " (no sliding window)"))
    need(config.qk_norm == qk_norm and (not qk_norm or config.qk_norm_scope == scope), arch,
         f"qk_norm={qk_norm}" + (f" with qk_norm_scope={scope!r}" if qk_norm else ""))
    need(not config.attention_output_gate and not config.zero_centered_norm, arch,
         "no attention output gate and plain (not zero-centred) norms")
    need(config.resolved_rotary_dim == config.resolved_head_dim, arch, "RoPE over the whole head")
    need_plain_blocks(config, arch)


def _check_moe(config: ModelConfig, arch: str, routers: tuple[tuple[str, bool], ...]) -> None:
    need(config.n_shared_experts == 0 and not config.use_selection_bias, arch, "no shared experts or selection bias")
    need((config.router, config.renormalize) in routers, arch, f"(router, renormalize) among {routers}")


def _layer_rules(config: ModelConfig, moe_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 moe_module: str = "mlp") -> list[Rule]:
    rules = embedding_rules(config, "model.embed_tokens.weight") + [same("model.norm.weight", "final_norm.weight")]
    for i, (_, ffn) in enumerate(config.layer_kinds()):
        hf, jx = f"model.layers.{i}", f"blocks.{i}"
        rules += block_norm_rules(hf, jx)
        rules += attention_rules(f"{hf}.self_attn", f"{jx}.mixer", config)
        if ffn == "E":
            rules += expert_rules(f"{hf}.{moe_module}", f"{jx}.ffn", config.n_experts, moe_names)
        else:
            rules += mlp_rules(f"{hf}.mlp", f"{jx}.ffn")
    return rules


# Llama ------------------------------------------------------------------------------------

def llama_to_config(hf: dict) -> ModelConfig:
    return ModelConfig(layer_pattern="A", ffn_pattern="D", d_ff=hf["intermediate_size"],
                       **_base(hf, "LlamaForCausalLM"))


def llama_from_config(config: ModelConfig) -> dict:
    arch = "LlamaForCausalLM"
    _check_attention(config, arch, qk_norm=False)
    need(all(f == "D" for _, f in config.layer_kinds()), arch, "a dense MLP in every layer")
    return {**common_hf_fields(config, arch, "llama"), **attention_hf_fields(config),
            "intermediate_size": config.d_ff, "mlp_bias": False}


# Qwen3 ------------------------------------------------------------------------------------

def qwen3_to_config(hf: dict) -> ModelConfig:
    arch = "Qwen3ForCausalLM"
    n = hf["num_hidden_layers"]
    letters, window = window_fields(hf, arch, hf.get("layer_types") or ["full_attention"] * n)
    return ModelConfig(layer_pattern=periodic(letters), ffn_pattern="D", d_ff=hf["intermediate_size"], qk_norm=True,
                       **window, **_base(hf, arch))


def _layer_types(config: ModelConfig) -> dict:
    kinds = ["sliding_attention" if m == "W" else "full_attention" for m, _ in config.layer_kinds()]
    windowed = "sliding_attention" in kinds
    return {"layer_types": kinds, "use_sliding_window": windowed, "sliding_window": config.window if windowed else None,
            "max_window_layers": config.n_layers}


def qwen3_from_config(config: ModelConfig) -> dict:
    arch = "Qwen3ForCausalLM"
    _check_attention(config, arch, qk_norm=True, windows=True)
    need(all(f == "D" for _, f in config.layer_kinds()), arch, "a dense MLP in every layer")
    return {**common_hf_fields(config, arch, "qwen3"), **attention_hf_fields(config), **_layer_types(config),
            "intermediate_size": config.d_ff}


# Mixtral ----------------------------------------------------------------------------------

MIXTRAL_EXPERTS = ("w1", "w3", "w2")


def mixtral_to_config(hf: dict) -> ModelConfig:
    arch = "MixtralForCausalLM"
    letter, window = _global_window(hf)
    return ModelConfig(
        layer_pattern=letter, ffn_pattern="E", d_ff=hf["intermediate_size"], n_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"], router="softmax_topk", renormalize=True, **window, **_base(hf, arch),
    )


def _uniform_window(config: ModelConfig, arch: str) -> dict:
    letters = {m for m, _ in config.layer_kinds()}
    need(len(letters) == 1, arch, "the same attention (full or sliding-window) in every layer")
    return {"sliding_window": config.window if letters == {"W"} else None}


def mixtral_from_config(config: ModelConfig) -> dict:
    arch = "MixtralForCausalLM"
    _check_attention(config, arch, qk_norm=False, windows=True)
    _check_moe(config, arch, (("softmax_topk", True), ("topk_softmax", False), ("topk_softmax", True)))
    need(all(f == "E" for _, f in config.layer_kinds()), arch, "experts in every layer")
    return {**common_hf_fields(config, arch, "mixtral", "rms_norm_eps"), **attention_hf_fields(config),
            **_uniform_window(config, arch), "intermediate_size": config.resolved_d_expert,
            "num_local_experts": config.n_experts, "num_experts_per_tok": config.top_k}


def mixtral_rules(config: ModelConfig) -> list[Rule]:
    return _layer_rules(config, MIXTRAL_EXPERTS, "block_sparse_moe")


# Qwen3Moe ---------------------------------------------------------------------------------

def qwen3_moe_to_config(hf: dict) -> ModelConfig:
    arch = "Qwen3MoeForCausalLM"
    letter, window = _global_window(hf)
    return ModelConfig(
        layer_pattern=letter, ffn_pattern=periodic(moe_pattern(hf)), qk_norm=True,
        d_ff=hf["intermediate_size"], d_expert=hf["moe_intermediate_size"], n_experts=num_experts(hf),
        top_k=hf["num_experts_per_tok"], router="softmax_topk", renormalize=bool(hf.get("norm_topk_prob", False)),
        **window, **_base(hf, arch),
    )


def _moe_layers(config: ModelConfig) -> dict:
    dense = [i for i, (_, f) in enumerate(config.layer_kinds()) if f == "D"]
    return {"mlp_only_layers": dense, "decoder_sparse_step": 1, "intermediate_size": config.d_ff,
            "moe_intermediate_size": config.resolved_d_expert, "num_experts": config.n_experts,
            "num_experts_per_tok": config.top_k, "norm_topk_prob": config.renormalize}


def qwen3_moe_from_config(config: ModelConfig) -> dict:
    arch = "Qwen3MoeForCausalLM"
    _check_attention(config, arch, qk_norm=True, windows=True)
    _check_moe(config, arch, (("softmax_topk", False), ("softmax_topk", True)))
    need(any(f == "E" for _, f in config.layer_kinds()), arch, "at least one MoE layer")
    window = _uniform_window(config, arch)
    return {**common_hf_fields(config, arch, "qwen3_moe"), **attention_hf_fields(config), **_moe_layers(config),
            **window, "use_sliding_window": window["sliding_window"] is not None}


# OLMoE ------------------------------------------------------------------------------------

def olmoe_to_config(hf: dict) -> ModelConfig:
    arch = "OlmoeForCausalLM"
    if hf.get("clip_qkv") is not None:
        raise unsupported(arch, f"clip_qkv={hf['clip_qkv']}", "clip_qkv null")
    return ModelConfig(
        layer_pattern="A", ffn_pattern="E", qk_norm=True, qk_norm_scope="all", d_ff=hf["intermediate_size"],
        n_experts=num_experts(hf), top_k=hf["num_experts_per_tok"], router="softmax_topk",
        renormalize=bool(hf.get("norm_topk_prob", False)), **common_fields(hf),
        n_layers=check_int(hf["num_hidden_layers"], arch, "num_hidden_layers"), **attention_fields(hf, arch),
    )


def olmoe_from_config(config: ModelConfig) -> dict:
    arch = "OlmoeForCausalLM"
    _check_attention(config, arch, qk_norm=True, scope="all")
    _check_moe(config, arch, (("softmax_topk", False), ("softmax_topk", True)))
    need(all(f == "E" for _, f in config.layer_kinds()), arch, "experts in every layer")
    need(config.resolved_head_dim * config.n_heads == config.d_model, arch, "head_dim · n_heads == d_model")
    return {**common_hf_fields(config, arch, "olmoe"), **attention_hf_fields(config), "clip_qkv": None,
            "intermediate_size": config.resolved_d_expert, "num_experts": config.n_experts,
            "num_experts_per_tok": config.top_k, "norm_topk_prob": config.renormalize}


ARCHITECTURES = [
    Architecture("LlamaForCausalLM", "llama", llama_to_config, llama_from_config, _layer_rules),
    Architecture("Qwen3ForCausalLM", "qwen3", qwen3_to_config, qwen3_from_config, _layer_rules),
    Architecture("MixtralForCausalLM", "mixtral", mixtral_to_config, mixtral_from_config, mixtral_rules),
    Architecture("Qwen3MoeForCausalLM", "qwen3_moe", qwen3_moe_to_config, qwen3_moe_from_config, _layer_rules),
    Architecture("OlmoeForCausalLM", "olmoe", olmoe_to_config, olmoe_from_config, _layer_rules),
]
