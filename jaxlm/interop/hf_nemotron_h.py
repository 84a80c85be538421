"""NemotronHForCausalLM: a hybrid stack whose layers each hold ONE of a Mamba-2 mixer, softmax
attention without position encoding, a squared-ReLU MLP or squared-ReLU experts, as
``backbone.layers.{i}.norm`` + ``.mixer`` with a residual around it.

In jaxlm terms each layer has one half of a Block: ``layers_block_type`` (or the legacy
``hybrid_override_pattern`` string M * - E) becomes layer_pattern M/A/- and ffn_pattern -/D/E,
e.g. ["linear_attention", "moe", "full_attention", "mlp"] -> "M-A-" / "-E-D". The experts route
by sigmoid scores with a selection bias (``gate.e_score_correction_bias``), renormalise if
norm_topk_prob, scale by routed_scaling_factor, and add one shared squared-ReLU expert. The
Mamba-2 gated norm is per group (mamba_ssm's), unlike Mamba2ForCausalLM's.
"""

from __future__ import annotations

from jaxlm.interop.hf_config import (
    Architecture, common_fields, common_hf_fields, embedding_rules, expect, need, need_plain_blocks, periodic,
    unsupported,
)
from jaxlm.interop.hf_mamba import mamba_fields, mamba_hf_fields, mixer_rules
from jaxlm.interop.hf_tensors import Rule, linear, same, stacked_linear
from jaxlm.models import ModelConfig

ARCH = "NemotronHForCausalLM"
# HF layer type -> (mixer, ffn) letters; "mamba" and "attention" are older spellings.
KINDS = {"linear_attention": ("M", "-"), "mamba": ("M", "-"), "full_attention": ("A", "-"),
         "attention": ("A", "-"), "mlp": ("-", "D"), "moe": ("-", "E")}
LEGACY_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
# Legacy config keys and the current ones.
RENAMED = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
           "mamba_dt_limit": "time_step_limit", "mamba_conv_bias": "use_conv_bias"}
ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("up_proj", "down_proj")
# Mamba2ForCausalLM's key -> Nemotron-H's (its head_dim is the attention's).
MAMBA_KEYS = {"num_heads": "mamba_num_heads", "head_dim": "mamba_head_dim", "state_size": "ssm_state_size"}


def _layer_types(hf: dict) -> list[str]:
    kinds = hf.get("layers_block_type") or hf.get("layer_types")
    if kinds is None and "hybrid_override_pattern" in hf:
        pattern = hf["hybrid_override_pattern"]
        bad = sorted(set(pattern) - set(LEGACY_PATTERN))
        if bad:
            raise unsupported(ARCH, f"hybrid_override_pattern characters {bad}", "M * - E")
        kinds = [LEGACY_PATTERN[c] for c in pattern]
    if not kinds:
        raise unsupported(ARCH, "a config without layers_block_type", "layers_block_type or hybrid_override_pattern")
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise unsupported(ARCH, f"layer types {bad}", ", ".join(repr(k) for k in KINDS))
    return kinds


def to_config(hf: dict) -> ModelConfig:
    hf = {**{new: hf[old] for old, new in RENAMED.items() if old in hf}, **hf}
    kinds = [KINDS[k] for k in _layer_types(hf)]
    expect(hf, ARCH, "mlp_hidden_act", "relu2", ("relu2",))
    expect(hf, ARCH, "mlp_bias", False, (False,))
    if hf.get("moe_latent_size") is not None:
        raise unsupported(ARCH, f"moe_latent_size={hf['moe_latent_size']}", "moe_latent_size null")
    n_group, topk_group = hf.get("n_group", 1) or 1, hf.get("topk_group", 1) or 1
    if n_group > 1 and topk_group < n_group:
        raise unsupported(ARCH, f"group-limited routing (n_group={n_group}, topk_group={topk_group})",
                          "every group eligible (topk_group == n_group)")
    fields = mamba_fields(hf, ARCH, heads_key="mamba_num_heads", head_dim_key="mamba_head_dim",
                          state_key="ssm_state_size", act_key="mamba_hidden_act", bias_key="use_bias",
                          heads_from_expand=False)
    n_heads = hf["num_attention_heads"]
    moe = {}
    if any(f == "E" for _, f in kinds):
        moe = dict(
            n_experts=hf.get("n_routed_experts", hf.get("num_local_experts")), top_k=hf["num_experts_per_tok"],
            d_expert=hf["moe_intermediate_size"], n_shared_experts=1,
            shared_d_ff=hf["moe_shared_expert_intermediate_size"],
            router="sigmoid", use_selection_bias=True, renormalize=bool(hf.get("norm_topk_prob", True)),
            routed_scale=float(hf.get("routed_scaling_factor", 1.0)),
        )
    return ModelConfig(
        n_layers=len(kinds), layer_pattern=periodic("".join(m for m, _ in kinds)),
        ffn_pattern=periodic("".join(f for _, f in kinds)), mlp_activation="relu2", d_ff=hf["intermediate_size"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, rotary_dim=0, **fields, **moe,
        **common_fields(hf, "layer_norm_epsilon"),
    )


def from_config(config: ModelConfig) -> dict:
    kinds = config.layer_kinds()
    names = {v: k for k, v in reversed(list(KINDS.items()))}  # the current spellings win
    need(all(k in names for k in kinds), ARCH, "one of a Mamba-2 mixer, attention, an MLP or experts per layer")
    need(config.mlp_activation == "relu2" and config.rotary_dim == 0 and not config.qk_norm
         and not config.attention_output_gate and not config.zero_centered_norm, ARCH,
         "relu2 feed-forwards and attention without RoPE, QK norm or output gate")
    need(config.resolved_mamba_norm_groups == config.mamba_n_groups, ARCH,
         "the gated norm per B/C group")
    need_plain_blocks(config, ARCH, activation="relu2")
    hf = {
        **common_hf_fields(config, ARCH, "nemotron_h", "layer_norm_epsilon"),
        "layers_block_type": [names[k] for k in kinds], "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.resolved_n_kv_heads, "head_dim": config.resolved_head_dim,
        "attention_bias": False, "intermediate_size": config.d_ff, "mlp_hidden_act": "relu2", "mlp_bias": False,
        "mamba_hidden_act": "silu", "residual_in_fp32": False,
        **{MAMBA_KEYS.get(k, k): v for k, v in mamba_hf_fields(config).items()},
    }
    if any(f == "E" for _, f in kinds):
        need(config.router == "sigmoid" and config.use_selection_bias and config.n_shared_experts == 1
             and config.capacity_factor is None, ARCH, "sigmoid routing with a selection bias and one shared expert")
        hf.update(n_routed_experts=config.n_experts, num_experts_per_tok=config.top_k,
                  moe_intermediate_size=config.resolved_d_expert,
                  moe_shared_expert_intermediate_size=config.resolved_shared_d_ff,
                  n_shared_experts=1, norm_topk_prob=config.renormalize, routed_scaling_factor=config.routed_scale,
                  n_group=1, topk_group=1, moe_latent_size=None)
    return hf


def rules(config: ModelConfig) -> list[Rule]:
    out = embedding_rules(config, "backbone.embeddings.weight") + [same("backbone.norm_f.weight", "final_norm.weight")]
    for i, (mixer, ffn) in enumerate(config.layer_kinds()):
        hf, jx = f"backbone.layers.{i}.mixer", f"blocks.{i}"
        norm = "mixer_norm" if mixer != "-" else "ffn_norm"
        out.append(same(f"backbone.layers.{i}.norm.weight", f"{jx}.{norm}.weight"))
        if mixer == "M":
            out += mixer_rules(hf, f"{jx}.mixer", config)
        elif mixer == "A":
            out += [linear(f"{hf}.{p}.weight", f"{jx}.mixer.{p}.kernel") for p in ATTENTION]
        elif ffn == "D":
            out += [linear(f"{hf}.{p}.weight", f"{jx}.ffn.{p}.kernel") for p in MLP]
        else:
            e = range(config.n_experts)
            out += [
                linear(f"{hf}.gate.weight", f"{jx}.ffn.router.kernel"),
                same(f"{hf}.gate.e_score_correction_bias", f"{jx}.ffn.selection_bias"),
                stacked_linear([f"{hf}.experts.{j}.up_proj.weight" for j in e], f"{jx}.ffn.w_up"),
                stacked_linear([f"{hf}.experts.{j}.down_proj.weight" for j in e], f"{jx}.ffn.w_down"),
            ]
            out += [linear(f"{hf}.shared_experts.{p}.weight", f"{jx}.ffn.shared.{p}.kernel") for p in MLP]
    return out


ARCHITECTURES = [Architecture(ARCH, "nemotron_h", to_config, from_config, rules, ignored=(r"^mtp\.",))]
