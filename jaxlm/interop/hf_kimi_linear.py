"""KimiLinearForCausalLM: Kimi Delta Attention and NoPE multi-head latent attention layers
(layer_types), each followed by a dense SwiGLU MLP or DeepSeek-V3-style experts (mlp_layer_types).

In jaxlm terms: mixer letters K (KDA) and C (MLA with mla_rope_layout None: transformers' Kimi
Linear rotates nothing, its qk_rope_head_dim channels are one shared unrotated key), feed-forward
letters D and E. The experts route by sigmoid scores with a selection bias
(``gate.e_score_correction_bias``), renormalise if moe_renormalize, scale by
routed_scaling_factor, and add shared experts of width moe_intermediate_size · num_shared_experts.

The tensors are named as transformers' save_pretrained writes them, which is the layout of
Moonshot's own checkpoints (transformers converts it when loading):
  self_attn.{q,k,v}_conv1d.weight [H·K, 1, W] each -> KDA's one conv_weight [3·H·K, W];
  self_attn.A_log [1, 1, H, 1] -> A_log [H]; self_attn.f_a_proj, f_b_proj, dt_bias (transformers'
    forget_gate.*) one to one;
  block_sparse_moe.experts.{e}.w1, w3, w2 (transformers fuses them into experts.gate_up_proj
    [E, 2F, D] and experts.down_proj [E, D, F] in memory) -> w_gate, w_up [E, D, F], w_down [E, F, D];
  block_sparse_moe.gate.weight, .gate.e_score_correction_bias, .shared_experts.* for MoE layers.
Dense layers are written under ``block_sparse_moe.`` too, as transformers writes them; Moonshot's
checkpoints keep them under ``mlp.``, which loading accepts (``RENAMES``).

Config fields are read under transformers' and Moonshot's spellings alike (num_experts or
num_local_experts, num_experts_per_token or num_experts_per_tok, ...); the layer pattern comes from
layer_types or Moonshot's ``linear_attn_config`` (1-indexed kda_layers and full_attn_layers), with
transformers' precedence. transformers' Kimi Linear never ties its head, whatever
tie_word_embeddings says, so a checkpoint always loads untied.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.interop.hf_config import (
    Architecture, block_norm_rules, check_int, common_fields, common_hf_fields, embedding_rules, expect,
    expert_rules, mlp_rules, need, periodic, unsupported,
)
from jaxlm.interop.hf_tensors import Arrays, Rule, linear, same
from jaxlm.models import ModelConfig

ARCH = "KimiLinearForCausalLM"
MIXERS = {"linear_attention": "K", "full_attention": "C"}
FFNS = {"dense": "D", "sparse": "E"}
# transformers' KimiLinearConfig defaults for fields that change the computation when absent.
RMS_NORM_EPS = 1e-5
ROUTED_SCALE = 2.446
# Each field's spellings, the one transformers writes first (its attribute_map reads either).
SPELLINGS = {
    "experts": ("num_experts", "num_local_experts"),
    "top_k": ("num_experts_per_token", "num_experts_per_tok"),
    "renormalize": ("moe_renormalize", "norm_topk_prob"),
    "groups": ("num_expert_group", "n_group"),
    "shared": ("num_shared_experts", "n_shared_experts"),
}
# Moonshot's checkpoints name dense layers' MLPs mlp.*, transformers block_sparse_moe.*.
RENAMES = ((r"^(model\.layers\.\d+)\.mlp\.", r"\1.block_sparse_moe."),)
KDA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "b_proj", "f_a_proj", "f_b_proj", "g_a_proj", "g_b_proj", "o_proj")


def _field(hf: dict, name: str, default: Any = KeyError) -> Any:
    """The value of SPELLINGS[name] under its first spelling present; KeyError naming the
    transformers spelling when none is and there is no default."""
    for key in SPELLINGS[name]:
        if key in hf:
            return hf[key]
    if default is KeyError:
        raise KeyError(SPELLINGS[name][0])
    return default


def _layer_types(hf: dict, n: int) -> list[str]:
    """layer_types, else linear_attn_config's 1-indexed lists, else transformers' default."""
    linear = hf.get("linear_attn_config") or {}
    kinds = hf.get("layer_types")
    if kinds is None and "kda_layers" in linear and "full_attn_layers" in linear:
        kinds = [None] * n
        for kind, key in (("full_attention", "full_attn_layers"), ("linear_attention", "kda_layers")):
            for layer in linear[key]:
                if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n:
                    raise unsupported(ARCH, f"linear_attn_config {key} entry {layer!r}", f"1-indexed layers 1..{n}")
                kinds[layer - 1] = kind
        unset = [i + 1 for i, k in enumerate(kinds) if k is None]
        if unset:
            raise unsupported(ARCH, f"layers {unset} in neither kda_layers nor full_attn_layers",
                              "every layer in one of them")
    if kinds is None:  # transformers' default, kept as it is
        kinds = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    bad = sorted({str(k) for k in kinds} - set(MIXERS))
    if bad or len(kinds) != n:
        raise unsupported(ARCH, f"layer_types {kinds}", f"{n} of 'linear_attention' and 'full_attention'")
    return kinds


def _mlp_types(hf: dict, n: int) -> list[str]:
    kinds = hf.get("mlp_layer_types")
    if kinds is None:
        dense = hf.get("first_k_dense_replace", 1)
        kinds = ["dense" if i < dense else "sparse" for i in range(n)]
    bad = sorted({str(k) for k in kinds} - set(FFNS))
    if bad or len(kinds) != n:
        raise unsupported(ARCH, f"mlp_layer_types {kinds}", f"{n} of 'dense' and 'sparse'")
    return kinds


def _kda_fields(hf: dict) -> dict:
    """KDA's heads, width and conv: linear_attn_config's values win over the flat fields, as in transformers."""
    linear = hf.get("linear_attn_config") or {}
    heads = linear["num_heads"] if "num_heads" in linear else hf["linear_num_heads"]
    width = linear["head_dim"] if "head_dim" in linear else hf["linear_head_dim"]
    conv = linear.get("short_conv_kernel_size", hf.get("linear_conv_kernel_dim", 4))
    return dict(linear_n_heads=check_int(heads, ARCH, "linear_num_heads"),
                linear_head_dim=check_int(width, ARCH, "linear_head_dim"),
                conv_size=check_int(conv, ARCH, "linear_conv_kernel_dim"))


def _mla_fields(hf: dict) -> dict:
    # Moonshot's flag for the NoPE latent attention that transformers always computes.
    expect(hf, ARCH, "mla_use_nope", True, (True,))
    heads = check_int(hf["num_attention_heads"], ARCH, "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:  # the latent expands to every head: transformers has no grouped form
        raise unsupported(ARCH, f"num_key_value_heads={kv_heads}",
                          f"num_key_value_heads == num_attention_heads ({heads})")
    v_dim = check_int(hf["v_head_dim"], ARCH, "v_head_dim")
    q_rank = hf.get("q_lora_rank")
    return dict(
        n_heads=heads, head_dim=v_dim, mla_kv_lora_rank=check_int(hf["kv_lora_rank"], ARCH, "kv_lora_rank"),
        mla_q_lora_rank=None if q_rank is None else check_int(q_rank, ARCH, "q_lora_rank"),
        mla_qk_nope_head_dim=check_int(hf["qk_nope_head_dim"], ARCH, "qk_nope_head_dim"),
        mla_qk_rope_head_dim=hf["qk_rope_head_dim"], mla_v_head_dim=v_dim, mla_rope_layout=None,
    )


def _moe_fields(hf: dict) -> dict:
    # transformers always scores with a sigmoid; a checkpoint that asks otherwise is not its model.
    expect(hf, ARCH, "moe_router_activation_func", "sigmoid", ("sigmoid",))
    groups, topk_group = _field(hf, "groups", 1) or 1, hf.get("topk_group", 1) or 1
    if groups > 1 and topk_group < groups:
        raise unsupported(ARCH, f"group-limited routing (n_group={groups}, topk_group={topk_group})",
                          "every group eligible (topk_group == n_group)")
    shared = _field(hf, "shared", 1)
    if not shared:
        raise unsupported(ARCH, "MoE layers without a shared expert", "num_shared_experts >= 1")
    d_expert = check_int(hf["moe_intermediate_size"], ARCH, "moe_intermediate_size")
    return dict(
        n_experts=_field(hf, "experts"), top_k=_field(hf, "top_k"), d_expert=d_expert,
        n_shared_experts=check_int(shared, ARCH, "num_shared_experts"), shared_d_ff=d_expert, router="sigmoid",
        use_selection_bias=True, renormalize=bool(_field(hf, "renormalize", True)),
        routed_scale=float(hf.get("routed_scaling_factor", ROUTED_SCALE)),
    )


def to_config(hf: dict) -> ModelConfig:
    n = check_int(hf["num_hidden_layers"], ARCH, "num_hidden_layers")
    mixers = "".join(MIXERS[k] for k in _layer_types(hf, n))
    ffns = "".join(FFNS[k] for k in _mlp_types(hf, n))
    expect(hf, ARCH, "hidden_act", "silu", ("silu",))
    expect(hf, ARCH, "attention_bias", False, (False,))
    # Moonshot's MoE placement; transformers ignores it and places experts by first_k_dense_replace alone.
    expect(hf, ARCH, "moe_layer_freq", 1, (1,))
    fields = {**common_fields(hf), "norm_eps": float(hf.get("rms_norm_eps", RMS_NORM_EPS)), "tie_embeddings": False}
    if "E" in ffns:
        fields.update(_moe_fields(hf))
    if "D" in ffns:
        fields["d_ff"] = check_int(hf["intermediate_size"], ARCH, "intermediate_size")
    if "K" in mixers:
        fields.update(_kda_fields(hf))
    if "C" in mixers:
        fields.update(_mla_fields(hf))
    return ModelConfig(n_layers=n, layer_pattern=periodic(mixers), ffn_pattern=periodic(ffns), **fields)


def from_config(config: ModelConfig) -> dict:
    kinds = config.layer_kinds()
    mixers, ffns = {m for m, _ in kinds}, {f for _, f in kinds}
    need(mixers <= {"K", "C"} and ffns <= {"D", "E"}, ARCH,
         "Kimi Delta Attention or latent attention, then a dense MLP or experts, in every layer")
    need(not config.residual_from_norm and (config.residual_scale, config.branch_scale) == (1.0, 1.0)
         and not config.zero_centered_norm and config.mlp_activation == "swiglu", ARCH,
         "pre-norm residuals x + f(norm(x)), plain RMSNorms and SwiGLU feed-forwards")
    hf = {
        **common_hf_fields(config, ARCH, "kimi_linear"), "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "intermediate_size": config.d_ff,
        # transformers' defaults are Moonshot's vocabulary ids, outside a smaller vocabulary.
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
        "layer_types": ["linear_attention" if m == "K" else "full_attention" for m, _ in kinds],
        "mlp_layer_types": ["dense" if f == "D" else "sparse" for _, f in kinds],
    }
    if "K" in mixers:
        k, v = config.linear_head_dims("K")
        need(v == k, ARCH, "KDA value heads as wide as the key heads (linear_head_v_dim = linear_head_dim)")
        hf.update(linear_num_heads=config.resolved_linear_n_heads, linear_head_dim=k,
                  linear_conv_kernel_dim=config.conv_size)
    if "C" in mixers:
        need(config.mla_rope_layout is None, ARCH, "latent attention without RoPE (mla_rope_layout None)")
        dims = config.mla_dims()
        hf.update(num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
                  q_lora_rank=config.mla_q_lora_rank, kv_lora_rank=dims["kv_lora_rank"],
                  qk_nope_head_dim=dims["qk_nope_head_dim"], qk_rope_head_dim=dims["qk_rope_head_dim"],
                  v_head_dim=dims["v_head_dim"])
    if "E" in ffns:
        need(config.router == "sigmoid" and config.use_selection_bias and config.capacity_factor is None, ARCH,
             "sigmoid routing with a selection bias, dropless experts")
        need(config.n_shared_experts >= 1 and config.resolved_shared_d_ff == config.resolved_d_expert
             and not config.shared_expert_gate, ARCH, "ungated shared experts as wide as the routed ones")
        # transformers' router ranks each group's two best experts, so it needs two.
        need(config.n_experts >= 2, ARCH, "at least two experts")
        hf.update(num_experts=config.n_experts, num_experts_per_token=config.top_k,
                  moe_intermediate_size=config.resolved_d_expert, num_shared_experts=config.n_shared_experts,
                  moe_renormalize=config.renormalize, routed_scaling_factor=config.routed_scale,
                  num_expert_group=1, topk_group=1)
    return hf


def _a_log(hf: str, jx: str) -> Rule:
    """A_log [1, 1, H, 1] (broadcast over batch, time and channels) <-> [H]."""

    def to_jax(a: Arrays) -> Arrays:
        if a[0].ndim != 4 or a[0].shape[:2] + a[0].shape[3:] != (1, 1, 1):
            raise ValueError(f"A_log must have shape [1, 1, H, 1], got {a[0].shape}")
        return [a[0].reshape(-1)]

    return Rule((hf,), (jx,), to_jax, lambda a: [a[0].reshape(1, 1, -1, 1)])


def _convs(hf: str, jx: str, widths: tuple[int, int, int]) -> Rule:
    """The q, k and v depthwise convs [C_i, 1, W] <-> one conv_weight [Σ C_i, W], q then k then v."""
    names = tuple(f"{hf}.{p}_conv1d.weight" for p in "qkv")
    bounds = np.cumsum(widths)[:-1]
    return Rule(names, (jx,), lambda a: [np.concatenate([w[:, 0, :] for w in a])],
                lambda a: [part[:, None, :] for part in np.split(a[0], bounds)])


def _kda_rules(hf: str, jx: str, config: ModelConfig) -> list[Rule]:
    heads, (k, v) = config.resolved_linear_n_heads, config.linear_head_dims("K")
    rules = [linear(f"{hf}.{p}.weight", f"{jx}.{p}.kernel") for p in KDA_PROJECTIONS]
    return rules + [
        _convs(hf, f"{jx}.conv_weight", (heads * k, heads * k, heads * v)),
        _a_log(f"{hf}.A_log", f"{jx}.A_log"),
        same(f"{hf}.dt_bias", f"{jx}.dt_bias"),
        same(f"{hf}.o_norm.weight", f"{jx}.o_norm.weight"),
    ]


def _mla_rules(hf: str, jx: str, config: ModelConfig) -> list[Rule]:
    low_rank = config.mla_q_lora_rank is not None
    projections = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"] + (["q_a_proj", "q_b_proj"] if low_rank else ["q_proj"])
    norms = ["kv_a_layernorm"] + (["q_a_layernorm"] if low_rank else [])
    return ([linear(f"{hf}.{p}.weight", f"{jx}.{p}.kernel") for p in projections]
            + [same(f"{hf}.{n}.weight", f"{jx}.{n}.weight") for n in norms])


def _embedding_rules(config: ModelConfig) -> list[Rule]:
    if not config.tie_embeddings:
        return embedding_rules(config, "model.embed_tokens.weight")
    # A tied jaxlm model: transformers' Kimi Linear has a head of its own, so the embedding goes
    # into both (loading it back gives an untied model with the same logits).
    return [Rule(("model.embed_tokens.weight", "lm_head.weight"), ("embed.embedding",),
                 lambda a: [a[0]], lambda a: [a[0], a[0]])]


def rules(config: ModelConfig) -> list[Rule]:
    out = _embedding_rules(config) + [same("model.norm.weight", "final_norm.weight")]
    for i, (mixer, ffn) in enumerate(config.layer_kinds()):
        hf, jx = f"model.layers.{i}", f"blocks.{i}"
        out += block_norm_rules(hf, jx)
        if mixer == "K":
            out += _kda_rules(f"{hf}.self_attn", f"{jx}.mixer", config)
        else:
            out += _mla_rules(f"{hf}.self_attn", f"{jx}.mixer", config)
        moe = f"{hf}.block_sparse_moe"
        if ffn == "E":
            out += expert_rules(moe, f"{jx}.ffn", config.n_experts, ("w1", "w3", "w2"))
            out.append(same(f"{moe}.gate.e_score_correction_bias", f"{jx}.ffn.selection_bias"))
            out += mlp_rules(f"{moe}.shared_experts", f"{jx}.ffn.shared")
        else:
            out += mlp_rules(moe, f"{jx}.ffn")
    return out


ARCHITECTURES = [Architecture(ARCH, "kimi_linear", to_config, from_config, rules, renames=RENAMES)]
