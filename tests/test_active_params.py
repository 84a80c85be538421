"""jaxlm.models.active_params: total and active parameters against counts by hand."""

from __future__ import annotations

import pytest

from jaxlm.models import count_params, preset
from jaxlm.models.active_params import count_active_params, param_counts


def _routed(config, moe_layers: int) -> int:
    """Routed expert weights by hand: gate, up and down [E, D, F_e] in each MoE layer."""
    return moe_layers * 3 * config.n_experts * config.d_model * config.resolved_d_expert


def test_a_dense_model_is_all_active():
    config = preset("transformer", "tiny")
    counts = param_counts(config)
    assert counts["active"] == counts["total"] == count_params(config)
    assert counts["routed_experts"] == counts["active_routed_experts"] == 0
    assert counts["embedding"] == config.vocab_size * config.d_model  # tied: the table alone


@pytest.mark.parametrize("name, dense_layers", [("qwen3_next", 0), ("minimax", 0), ("kimi_linear", 1)])
def test_moe_models_count_top_k_of_their_routed_experts(name, dense_layers):
    config = preset(name, "tiny")
    counts = param_counts(config)
    routed = _routed(config, config.n_layers - dense_layers)
    assert counts["total"] == count_params(config)
    assert counts["routed_experts"] == routed
    assert counts["active_routed_experts"] == routed * config.top_k // config.n_experts
    assert counts["active"] == counts["total"] - routed + routed * config.top_k // config.n_experts
    assert count_active_params(config) == counts["active"]


def test_nemotron_h_counts_only_its_moe_layers():
    config = preset("nemotron_h", "tiny")  # "M-M-M-A-" with ffn "-E": every other layer is an MoE layer
    moe_layers = sum(ffn == "E" for _, ffn in config.layer_kinds())
    assert moe_layers == config.n_layers // 2
    assert param_counts(config)["routed_experts"] == _routed(config, moe_layers)


def test_every_expert_active_and_an_untied_head():
    config = preset("qwen3_next", "tiny", top_k=8, n_experts=8, tie_embeddings=False)
    counts = param_counts(config)
    assert counts["active"] == counts["total"]
    assert counts["embedding"] == 2 * config.vocab_size * config.d_model


def test_param_counts_refuses_what_is_not_a_config():
    with pytest.raises(ValueError, match="ModelConfig"):
        param_counts("qwen3_next")
