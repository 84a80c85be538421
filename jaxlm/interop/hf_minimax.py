"""MiniMaxForCausalLM (MiniMax-01): Lightning attention and softmax attention layers
(layer_types), each followed by Mixtral-style experts, in MiniMax's post-norm residual form.

transformers' MiniMax decoder layer is  h = norm(x);  x = α·h + β·f(h)  per branch (the residual
continues from the normalised input): jaxlm's ``residual_from_norm`` with residual_scale α and
branch_scale β, which must be the same for the attention, Lightning and MLP branches.
Lightning attention's fused ``qkv_proj`` [H·3K, D] holds per head [q_h, k_h, v_h] and splits into
q_proj, k_proj, v_proj; its output RMSNorm has transformers' fixed eps 1e-6; its per-head decays
follow from the layer index: transformers' decay buffers (slope_rate, query_decay, key_decay,
diagonal_decay) are derived from the config, so they are neither read nor written.
"""

from __future__ import annotations

from jaxlm.interop.hf_config import (
    Architecture, attention_fields, attention_hf_fields, attention_rules, block_norm_rules, check_int,
    common_fields, common_hf_fields, embedding_rules, expert_rules, need, periodic, unsupported,
)
from jaxlm.interop.hf_tensors import Rule, grouped_rows, linear, same
from jaxlm.models import ModelConfig

ARCH = "MiniMaxForCausalLM"
MIXERS = {"linear_attention": "L", "full_attention": "A"}
LIGHTNING_NORM_EPS = 1e-6  # MiniMaxLightningAttention's RMSNorm keeps its default eps
BRANCHES = ("full_attn", "linear_attn", "mlp")
MIXTRAL_ROUTERS = {("softmax_topk", True), ("topk_softmax", True), ("topk_softmax", False)}  # all the same function


def _scales(hf: dict) -> dict:
    alphas = {hf.get(f"{b}_alpha_factor", 1) for b in BRANCHES}
    betas = {hf.get(f"{b}_beta_factor", 1) for b in BRANCHES}
    if len(alphas) > 1 or len(betas) > 1:
        raise unsupported(ARCH, f"different residual factors per branch (alpha {sorted(alphas)}, beta {sorted(betas)})",
                          "one alpha and one beta shared by the full_attn, linear_attn and mlp factors")
    return dict(residual_scale=float(alphas.pop()), branch_scale=float(betas.pop()))


def to_config(hf: dict) -> ModelConfig:
    n = check_int(hf["num_hidden_layers"], ARCH, "num_hidden_layers")
    kinds = hf.get("layer_types") or ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(n)]
    bad = sorted(set(kinds) - set(MIXERS))
    if bad:
        raise unsupported(ARCH, f"layer types {bad}", "'linear_attention' and 'full_attention'")
    attention = attention_fields(hf, ARCH)
    window = hf.get("sliding_window")
    letters = "".join(MIXERS[k] for k in kinds)
    if window:
        letters = letters.replace("A", "W")
    return ModelConfig(
        n_layers=n, layer_pattern=periodic(letters), ffn_pattern="E", d_ff=hf["intermediate_size"],
        n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], router="softmax_topk", renormalize=True,
        linear_n_heads=attention["n_heads"], linear_head_dim=attention["head_dim"],
        lightning_norm_eps=LIGHTNING_NORM_EPS, residual_from_norm=True, **({"window": int(window)} if window else {}),
        **_scales(hf), **attention, **common_fields(hf),
    )


def from_config(config: ModelConfig) -> dict:
    kinds = config.layer_kinds()
    mixers = {m for m, _ in kinds}
    need(mixers <= {"L", "A", "W"} and not {"A", "W"} <= mixers and all(f == "E" for _, f in kinds), ARCH,
         "Lightning or (all full, or all sliding-window) attention, then experts, in every layer")
    need(config.residual_from_norm and config.resolved_lightning_norm_eps == LIGHTNING_NORM_EPS, ARCH,
         f"post-norm residuals and Lightning norm eps {LIGHTNING_NORM_EPS}")
    need(config.resolved_linear_n_heads == config.n_heads
         and config.linear_head_dims("L")[0] == config.resolved_head_dim, ARCH,
         "Lightning heads equal to the attention heads")
    need(not config.qk_norm and not config.attention_output_gate and not config.zero_centered_norm
         and config.resolved_rotary_dim == config.resolved_head_dim, ARCH, "plain attention with full RoPE")
    need(config.n_shared_experts == 0 and not config.use_selection_bias and config.capacity_factor is None
         and config.mlp_activation == "swiglu" and config.routed_scale == 1.0
         and (config.router, config.renormalize) in MIXTRAL_ROUTERS,
         ARCH, "Mixtral-style experts: softmax, top-k, renormalised; no shared experts")
    factors = {f"{b}_{k}_factor": v for b in BRANCHES
               for k, v in (("alpha", config.residual_scale), ("beta", config.branch_scale))}
    return {
        **common_hf_fields(config, ARCH, "minimax"), **attention_hf_fields(config), **factors,
        "layer_types": ["linear_attention" if m == "L" else "full_attention" for m, _ in kinds],
        "sliding_window": config.window if "W" in mixers else None, "intermediate_size": config.resolved_d_expert,
        "num_local_experts": config.n_experts, "num_experts_per_tok": config.top_k,
    }


def _lightning_rules(hf: str, jx: str, config: ModelConfig) -> list[Rule]:
    k = config.resolved_head_dim
    return [
        grouped_rows(f"{hf}.qkv_proj.weight", [f"{jx}.{p}.kernel" for p in ("q_proj", "k_proj", "v_proj")],
                     config.n_heads, [k, k, k]),
        linear(f"{hf}.output_gate.weight", f"{jx}.output_gate.kernel"),
        same(f"{hf}.norm.weight", f"{jx}.norm.weight"),
        linear(f"{hf}.out_proj.weight", f"{jx}.out_proj.kernel"),
    ]


def rules(config: ModelConfig) -> list[Rule]:
    out = embedding_rules(config, "model.embed_tokens.weight") + [same("model.norm.weight", "final_norm.weight")]
    for i, (mixer, _) in enumerate(config.layer_kinds()):
        hf, jx = f"model.layers.{i}", f"blocks.{i}"
        out += block_norm_rules(hf, jx)
        if mixer == "L":
            out += _lightning_rules(f"{hf}.self_attn", f"{jx}.mixer", config)
        else:
            out += attention_rules(f"{hf}.self_attn", f"{jx}.mixer", config)
        out += expert_rules(f"{hf}.block_sparse_moe", f"{jx}.ffn", config.n_experts, ("w1", "w3", "w2"))
    return out


# Persistent buffers transformers computes from the config (and recomputes when absent): not read, not written.
DERIVED = r"\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$"
ARCHITECTURES = [Architecture(ARCH, "minimax", to_config, from_config, rules, ignored=(DERIVED,))]
