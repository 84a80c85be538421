"""Named model families in named sizes: ``preset(name, size="tiny", **overrides) -> ModelConfig``.

A size fixes the width, depth and vocabulary; a family fixes the layer pattern and the mixer
options. One width per family and size (``_FILL``: the feed-forward or expert width, or Mamba-2's
depth) was solved so that ``count_params`` lands within 10% of the size's name, counting every
parameter (all experts of an MoE). Overrides apply last and may move the count.

tiny and small use the byte vocabulary (256), so that they train on raw text out of the box;
the larger sizes use 32768 tokens.
"""

from __future__ import annotations

from typing import Any

from jaxlm.models.config import ModelConfig

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, d_model=128, n_heads=4, n_layers=4),
    "small": dict(vocab_size=256, d_model=384, n_heads=6, n_layers=8),
    "125m": dict(vocab_size=32768, d_model=768, n_heads=12, n_layers=12),
    "350m": dict(vocab_size=32768, d_model=1024, n_heads=16, n_layers=24),
    "1.3b": dict(vocab_size=32768, d_model=2048, n_heads=16, n_layers=24),
}
TARGET_PARAMS = {"tiny": 1e6, "small": 20e6, "125m": 125e6, "350m": 350e6, "1.3b": 1.3e9}


def _linear_heads(size: dict[str, Any], grouped_values: bool = False) -> dict[str, Any]:
    """Linear mixers: H/2 query-key heads of width D/H, so keys take D/2 channels and values D
    (two value heads per key head when grouped, else value heads twice as wide)."""
    d, h = size["d_model"], size["n_heads"]
    if grouped_values:
        return dict(linear_n_heads=h // 2, linear_n_v_heads=h, linear_head_dim=d // h, linear_head_v_dim=d // h)
    return dict(linear_n_heads=h // 2, linear_head_dim=d // h, linear_head_v_dim=2 * d // h)


def _mamba(size_name: str) -> dict[str, Any]:
    small = size_name in ("tiny", "small")
    return dict(mamba_head_dim=32 if small else 64, mamba_d_state=16 if size_name == "tiny" else 64)


def _window(size_name: str) -> int:
    return {"tiny": 16, "small": 256}.get(size_name, 2048)


def _transformer(size_name: str, size: dict) -> dict:
    return dict(layer_pattern="A", ffn_pattern="D", n_kv_heads=size["n_heads"] // 2)


def _mamba2(size_name: str, size: dict) -> dict:
    return dict(layer_pattern="M", ffn_pattern="-", **_mamba(size_name))


def _gated_deltanet(size_name: str, size: dict) -> dict:
    return dict(layer_pattern="G", ffn_pattern="D", **_linear_heads(size))


def _gla(size_name: str, size: dict) -> dict:
    return dict(layer_pattern="V", ffn_pattern="D", **_linear_heads(size))


def _gdn_h1(size_name: str, size: dict) -> dict:
    return dict(layer_pattern="GW", ffn_pattern="D", window=_window(size_name), **_linear_heads(size))


def _minimax(size_name: str, size: dict) -> dict:
    return dict(
        layer_pattern="LLLLLLLA", ffn_pattern="E", n_layers=max(8, size["n_layers"] // 8 * 8),
        linear_n_heads=size["n_heads"], n_experts=4 if size_name == "tiny" else 8, top_k=2, renormalize=True,
    )


def _qwen3_next(size_name: str, size: dict) -> dict:
    h = size["n_heads"]
    return dict(
        layer_pattern="GGGA", ffn_pattern="E", zero_centered_norm=True, qk_norm=True,
        attention_output_gate=True, n_kv_heads=max(1, h // 4), rotary_dim=size["d_model"] // h // 4,
        n_experts=8 if size_name == "tiny" else 16, top_k=2, renormalize=True,
        n_shared_experts=1, shared_expert_gate=True, **_linear_heads(size, grouped_values=True),
    )


def _nemotron_h(size_name: str, size: dict) -> dict:
    return dict(
        layer_pattern="M-M-M-A-", ffn_pattern="-E", n_layers=max(8, 2 * size["n_layers"] // 8 * 8),
        n_kv_heads=max(1, size["n_heads"] // 4), n_experts=8, top_k=2, renormalize=True, **_mamba(size_name),
    )


def _kimi_linear(size_name: str, size: dict) -> dict:
    """KDA and MLA 3:1 (MLA without positions, as Kimi Linear), a dense first layer, then
    DeepSeek-V3-style experts: sigmoid router, auxiliary-loss-free selection bias, one shared expert."""
    d, h = size["d_model"], size["n_heads"]
    return dict(
        layer_pattern="KKKC", ffn_pattern="D" + "E" * (size["n_layers"] - 1), linear_n_heads=h,
        linear_head_dim=d // h, mla_rope_layout=None, d_ff=4 * d, n_experts=8 if size_name == "tiny" else 16,
        top_k=2, router="sigmoid", renormalize=True, use_selection_bias=True, n_shared_experts=1,
    )


FAMILIES = {
    "transformer": _transformer,
    "mamba2": _mamba2,
    "gated_deltanet": _gated_deltanet,
    "gla": _gla,
    "gdn_h1": _gdn_h1,
    "minimax": _minimax,
    "qwen3_next": _qwen3_next,
    "nemotron_h": _nemotron_h,
    "kimi_linear": _kimi_linear,
}

# The one width per family and size that sets the parameter count (see the module docstring).
_FILL: dict[str, dict[str, dict[str, int]]] = {
    "transformer": {
        "tiny": dict(d_ff=496), "small": dict(d_ff=1792), "125m": dict(d_ff=2816),
        "350m": dict(d_ff=3264), "1.3b": dict(d_ff=6336),
    },
    "mamba2": {
        "tiny": dict(n_layers=9), "small": dict(n_layers=21), "125m": dict(n_layers=27),
        "350m": dict(n_layers=49), "1.3b": dict(n_layers=48),
    },
    "gated_deltanet": {
        "tiny": dict(d_ff=448), "small": dict(d_ff=1664), "125m": dict(d_ff=2560),
        "350m": dict(d_ff=2944), "1.3b": dict(d_ff=5632),
    },
    "gla": {
        "tiny": dict(d_ff=448), "small": dict(d_ff=1664), "125m": dict(d_ff=2560),
        "350m": dict(d_ff=2944), "1.3b": dict(d_ff=5632),
    },
    "gdn_h1": {
        "tiny": dict(d_ff=464), "small": dict(d_ff=1664), "125m": dict(d_ff=2560),
        "350m": dict(d_ff=2944), "1.3b": dict(d_ff=5632),
    },
    "minimax": {
        "tiny": dict(d_expert=24), "small": dict(d_expert=192), "125m": dict(d_expert=520),
        "350m": dict(d_expert=328), "1.3b": dict(d_expert=632),
    },
    "qwen3_next": {
        "tiny": dict(d_expert=48), "small": dict(d_expert=96), "125m": dict(d_expert=152),
        "350m": dict(d_expert=176), "1.3b": dict(d_expert=336),
    },
    "kimi_linear": {
        "tiny": dict(d_expert=48), "small": dict(d_expert=96), "125m": dict(d_expert=152),
        "350m": dict(d_expert=176), "1.3b": dict(d_expert=328),
    },
    "nemotron_h": {
        "tiny": dict(d_expert=48), "small": dict(d_expert=184), "125m": dict(d_expert=280),
        "350m": dict(d_expert=312), "1.3b": dict(d_expert=600),
    },
}


def preset(name: str, size: str = "tiny", **overrides: Any) -> ModelConfig:
    """The config of family ``name`` at ``size``; ``overrides`` replace any ModelConfig field."""
    if name not in FAMILIES:
        raise ValueError(f"unknown preset {name!r}; the presets are {sorted(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; the sizes are {list(SIZES)}")
    fields = dict(SIZES[size])
    fields.update(FAMILIES[name](size, SIZES[size]))
    fields.update(_FILL.get(name, {}).get(size, {}))
    if size == "tiny":
        fields.update(chunk_size=16)
    return ModelConfig().replace(**fields).replace(**overrides)
