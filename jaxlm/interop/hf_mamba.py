"""Mamba2ForCausalLM: a stack of RMSNorm + Mamba-2 mixer layers under ``backbone``.

The gated output norm works per B/C group, as in mamba_ssm and in transformers from 5.24 on
(earlier transformers normalised all d_inner channels at once, which differs when n_groups > 1;
those versions are not supported as a reference). The mixer's tensors
map one to one: in_proj [z, xBC, dt] is jaxlm's fused in_proj, conv1d [C, 1, W] its depthwise
filter. The Mamba-2 mixer rules are shared with Nemotron-H (hf_nemotron_h.py).
"""

from __future__ import annotations

import math

from jaxlm.interop.hf_config import (
    Architecture, as_float, check_int, common_fields, common_hf_fields, embedding_rules, expect, need,
    need_plain_blocks, unsupported,
)
from jaxlm.interop.hf_tensors import Rule, conv, linear, same
from jaxlm.models import ModelConfig

ARCH = "Mamba2ForCausalLM"


def mamba_fields(hf: dict, arch: str, *, heads_key: str, head_dim_key: str, state_key: str, act_key: str,
                 bias_key: str, heads_from_expand: bool) -> dict:
    """ModelConfig's Mamba-2 fields from an HF config; the key names differ between models.
    ``heads_from_expand``: d_inner is expand·hidden_size (Mamba2), else heads·head_dim (Nemotron-H)."""
    expect(hf, arch, act_key, "silu", ("silu",))
    expect(hf, arch, bias_key, False, (False,))
    limit = tuple(as_float(v) for v in hf.get("time_step_limit", (0.0, math.inf)))
    if limit != (0.0, math.inf):
        raise unsupported(arch, f"time_step_limit={list(limit)}", "(0.0, inf): no clamp on dt")
    d_model = hf["hidden_size"]
    expand = check_int(hf.get("expand", 2), arch, "expand")
    head_dim = check_int(hf[head_dim_key], arch, head_dim_key)
    heads = check_int(hf[heads_key], arch, heads_key)
    if heads_from_expand and heads * head_dim != expand * d_model:
        raise unsupported(arch, f"{heads_key}·{head_dim_key} != expand·hidden_size", "heads that tile d_inner")
    return dict(
        mamba_d_state=check_int(hf[state_key], arch, state_key), mamba_expand=expand, mamba_head_dim=head_dim,
        mamba_n_heads=None if heads_from_expand else heads,
        mamba_n_groups=check_int(hf.get("n_groups", 1), arch, "n_groups"),
        mamba_conv_bias=bool(hf.get("use_conv_bias", True)),
        conv_size=check_int(hf.get("conv_kernel", 4), arch, "conv_kernel"),
    )


def mamba_hf_fields(config: ModelConfig) -> dict:
    return {
        "state_size": config.mamba_d_state, "expand": config.mamba_expand, "head_dim": config.mamba_head_dim,
        "num_heads": config.resolved_mamba_n_heads, "n_groups": config.mamba_n_groups,
        "conv_kernel": config.conv_size, "use_conv_bias": config.mamba_conv_bias, "use_bias": False,
    }


def mixer_rules(hf: str, jx: str, config: ModelConfig) -> list[Rule]:
    """One Mamba-2 mixer: ``{hf}.in_proj``, conv1d, dt_bias, A_log, D, norm, out_proj."""
    rules = [
        linear(f"{hf}.in_proj.weight", f"{jx}.in_proj.kernel"),
        conv(f"{hf}.conv1d.weight", f"{jx}.conv_weight"),
        linear(f"{hf}.out_proj.weight", f"{jx}.out_proj.kernel"),
    ]
    rules += [same(f"{hf}.{n}", f"{jx}.{n}") for n in ("dt_bias", "A_log", "D")]
    rules.append(same(f"{hf}.norm.weight", f"{jx}.norm.weight"))
    if config.mamba_conv_bias:
        rules.append(same(f"{hf}.conv1d.bias", f"{jx}.conv_bias"))
    return rules


def to_config(hf: dict) -> ModelConfig:
    fields = mamba_fields(hf, ARCH, heads_key="num_heads", head_dim_key="head_dim", state_key="state_size",
                          act_key="hidden_act", bias_key="use_bias", heads_from_expand=True)
    return ModelConfig(
        layer_pattern="M", ffn_pattern="-", n_layers=check_int(hf["num_hidden_layers"], ARCH, "num_hidden_layers"),
        **fields, **common_fields(hf, "layer_norm_epsilon"),
    )


def from_config(config: ModelConfig) -> dict:
    need(all(k == ("M", "-") for k in config.layer_kinds()), ARCH, "a Mamba-2 mixer alone in every layer")
    need_plain_blocks(config, ARCH)
    need(config.resolved_mamba_norm_groups == config.mamba_n_groups, ARCH,
         "the gated norm per B/C group (mamba_norm_groups = mamba_n_groups)")
    need(config.mamba_d_inner == config.mamba_expand * config.d_model, ARCH,
         "d_inner = expand · d_model")
    return {
        **common_hf_fields(config, ARCH, "mamba2", "layer_norm_epsilon"), **mamba_hf_fields(config),
        "hidden_act": "silu", "residual_in_fp32": True,
    }


def rules(config: ModelConfig) -> list[Rule]:
    out = embedding_rules(config, "backbone.embeddings.weight") + [same("backbone.norm_f.weight", "final_norm.weight")]
    for i in range(config.n_layers):
        out.append(same(f"backbone.layers.{i}.norm.weight", f"blocks.{i}.mixer_norm.weight"))
        out += mixer_rules(f"backbone.layers.{i}.mixer", f"blocks.{i}.mixer", config)
    return out


ARCHITECTURES = [Architecture(ARCH, "mamba2", to_config, from_config, rules)]
