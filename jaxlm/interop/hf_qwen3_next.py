"""Qwen3NextForCausalLM: Gated DeltaNet and gated softmax attention layers (layer_types), each
followed by routed experts with a gated shared expert (or a dense MLP), zero-centred RMSNorms.

Fused projections and how they split:
  linear_attn.in_proj_qkvz [H·(2K + 2r·V), D]: per key head h, rows [q_h, k_h, v_h·r, z_h·r]
    (r = HV/H value heads per key head) -> q_proj, k_proj, v_proj, g_proj (z is the output gate);
  linear_attn.in_proj_ba [H·2r, D]: per key head, [b_h·r, a_h·r] -> b_proj (β), a_proj (decay);
  self_attn.q_proj [H·2K, D]: per head, [q_h, gate_h] -> q_proj, gate_proj (sigmoid output gate).
Grouped value heads keep their order: value head j = h·r + i reads key head h, as jaxlm's
grouped-value ops do. Multi-token-prediction tensors (``mtp.*``) are ignored, as transformers does.
"""

from __future__ import annotations

from jaxlm.interop.hf_config import (
    Architecture, attention_fields, attention_hf_fields, block_norm_rules, check_int, common_fields,
    common_hf_fields, embedding_rules, expert_rules, mlp_rules, moe_pattern, need, need_plain_blocks, num_experts,
    periodic, unsupported,
)
from jaxlm.interop.hf_tensors import Rule, conv, grouped_rows, linear, same
from jaxlm.models import ModelConfig

ARCH = "Qwen3NextForCausalLM"
MIXERS = {"linear_attention": "G", "full_attention": "A"}


def to_config(hf: dict) -> ModelConfig:
    n = check_int(hf["num_hidden_layers"], ARCH, "num_hidden_layers")
    kinds = hf.get("layer_types") or ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    bad = sorted(set(kinds) - set(MIXERS))
    if bad:
        raise unsupported(ARCH, f"layer types {bad}", "'linear_attention' and 'full_attention'")
    ffn = moe_pattern(hf)
    moe = {}
    if "E" in ffn:
        if not hf.get("shared_expert_intermediate_size"):
            raise unsupported(ARCH, "MoE layers without a shared expert", "shared_expert_intermediate_size > 0")
        moe = dict(
            d_expert=hf["moe_intermediate_size"], n_experts=num_experts(hf), top_k=hf["num_experts_per_tok"],
            n_shared_experts=1, shared_d_ff=hf["shared_expert_intermediate_size"], shared_expert_gate=True,
            router="softmax_topk", renormalize=bool(hf.get("norm_topk_prob", True)),
        )
    return ModelConfig(
        n_layers=n, layer_pattern=periodic("".join(MIXERS[k] for k in kinds)), ffn_pattern=periodic(ffn),
        zero_centered_norm=True, qk_norm=True, attention_output_gate=True, d_ff=hf["intermediate_size"],
        linear_n_heads=hf["linear_num_key_heads"], linear_head_dim=hf["linear_key_head_dim"],
        linear_n_v_heads=hf["linear_num_value_heads"], linear_head_v_dim=hf["linear_value_head_dim"],
        conv_size=hf.get("linear_conv_kernel_dim", 4), **moe, **common_fields(hf),
        **attention_fields(hf, ARCH, partial_rotary=True),
    )


def from_config(config: ModelConfig) -> dict:
    kinds = config.layer_kinds()
    need({m for m, _ in kinds} <= {"G", "A"} and {f for _, f in kinds} <= {"D", "E"}, ARCH,
         "Gated DeltaNet or attention, then a dense MLP or experts, in every layer")
    need(config.zero_centered_norm and config.qk_norm and config.qk_norm_scope == "head"
         and config.attention_output_gate, ARCH, "zero-centred norms, per-head QK norm and the attention output gate")
    need(not config.allow_neg_eigval, ARCH, "β = sigmoid(b) (allow_neg_eigval=False)")
    need_plain_blocks(config, ARCH)
    hf = {
        **common_hf_fields(config, ARCH, "qwen3_next"), **attention_hf_fields(config),
        "layer_types": ["linear_attention" if m == "G" else "full_attention" for m, _ in kinds],
        "intermediate_size": config.d_ff, "linear_conv_kernel_dim": config.conv_size,
        **{f"linear_{k}": v for k, v in _linear_dims(config).items()},
        "mlp_only_layers": [i for i, (_, f) in enumerate(kinds) if f == "D"], "decoder_sparse_step": 1,
    }
    if any(f == "E" for _, f in kinds):
        need(config.n_shared_experts == 1 and config.shared_expert_gate and config.router == "softmax_topk"
             and not config.use_selection_bias and config.capacity_factor is None, ARCH,
             "one gated shared expert, softmax-then-top-k routing, no selection bias, dropless experts")
        hf.update(moe_intermediate_size=config.resolved_d_expert,
                  shared_expert_intermediate_size=config.resolved_shared_d_ff, num_experts=config.n_experts, num_experts_per_tok=config.top_k, norm_topk_prob=config.renormalize)
    else:
        hf.update(num_experts=0)
    return hf


def _linear_dims(config: ModelConfig) -> dict:
    """Gated DeltaNet's key heads H, their width K, value heads HV and their width V."""
    k, v = config.linear_head_dims("G")
    return dict(num_key_heads=config.resolved_linear_n_heads, key_head_dim=k,
                num_value_heads=config.resolved_linear_n_v_heads, value_head_dim=v)


def _deltanet_rules(hf: str, jx: str, config: ModelConfig) -> list[Rule]:
    d = _linear_dims(config)
    h, r = d["num_key_heads"], d["num_value_heads"] // d["num_key_heads"]
    k, v = d["key_head_dim"], d["value_head_dim"]
    return [
        grouped_rows(f"{hf}.in_proj_qkvz.weight", [f"{jx}.{p}_proj.kernel" for p in "qkvg"], h, [k, k, r * v, r * v]),
        grouped_rows(f"{hf}.in_proj_ba.weight", [f"{jx}.b_proj.kernel", f"{jx}.a_proj.kernel"], h, [r, r]),
        conv(f"{hf}.conv1d.weight", f"{jx}.conv_weight"),
        same(f"{hf}.dt_bias", f"{jx}.dt_bias"),
        same(f"{hf}.A_log", f"{jx}.A_log"),
        same(f"{hf}.norm.weight", f"{jx}.o_norm.weight"),
        linear(f"{hf}.out_proj.weight", f"{jx}.o_proj.kernel"),
    ]


def _attention_rules(hf: str, jx: str, config: ModelConfig) -> list[Rule]:
    k = config.resolved_head_dim
    q_and_gate = [f"{jx}.q_proj.kernel", f"{jx}.gate_proj.kernel"]
    rules = [grouped_rows(f"{hf}.q_proj.weight", q_and_gate, config.n_heads, [k, k])]
    rules += [linear(f"{hf}.{p}.weight", f"{jx}.{p}.kernel") for p in ("k_proj", "v_proj", "o_proj")]
    rules += [same(f"{hf}.{n}.weight", f"{jx}.{n}.weight") for n in ("q_norm", "k_norm")]
    return rules


def rules(config: ModelConfig) -> list[Rule]:
    out = embedding_rules(config, "model.embed_tokens.weight") + [same("model.norm.weight", "final_norm.weight")]
    for i, (mixer, ffn) in enumerate(config.layer_kinds()):
        hf, jx = f"model.layers.{i}", f"blocks.{i}"
        out += block_norm_rules(hf, jx)
        if mixer == "G":
            out += _deltanet_rules(f"{hf}.linear_attn", f"{jx}.mixer", config)
        else:
            out += _attention_rules(f"{hf}.self_attn", f"{jx}.mixer", config)
        if ffn == "E":
            out += expert_rules(f"{hf}.mlp", f"{jx}.ffn", config.n_experts, ("gate_proj", "up_proj", "down_proj"))
            out += mlp_rules(f"{hf}.mlp.shared_expert", f"{jx}.ffn.shared")
            out.append(linear(f"{hf}.mlp.shared_expert_gate.weight", f"{jx}.ffn.shared_gate.kernel"))
        else:
            out += mlp_rules(f"{hf}.mlp", f"{jx}.ffn")
    return out


ARCHITECTURES = [Architecture(ARCH, "qwen3_next", to_config, from_config, rules, ignored=(r"^mtp\.",))]
