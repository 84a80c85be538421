"""ModelConfig's defaults and vocabularies, each defined once: the resolved widths equal what the
layers themselves default to, and the lists of choices (and the CLI's) are the owners' tables."""

from __future__ import annotations

import typing

import jax
import pytest
from flax import nnx

from jaxlm import layers, ops
from jaxlm.layers import attention, mlp
from jaxlm.models import FAMILIES, LM, SIZES, ModelConfig, config as config_module
from jaxlm.models.block import build_ffn, build_mixer
from jaxlm.training import args, optimizer

# Every width and head count left None, with sizes whose defaults divide evenly.
CONFIG = ModelConfig(d_model=96, n_heads=4, mamba_head_dim=16, mamba_d_state=8, n_experts=4, n_shared_experts=1)


def _shapes(build) -> dict:
    module = nnx.eval_shape(build)
    return {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(module))}


def _standalone(kind: str, c: ModelConfig):
    """The layer for ``kind`` built with nothing but the layer's own defaults for its widths."""
    rngs = nnx.Rngs(0)
    d, h = c.d_model, c.n_heads
    if kind == "A":
        return layers.Attention(d, h, rngs=rngs)
    if kind == "G":
        return layers.GatedDeltaNet(d, h, conv_size=c.conv_size, rngs=rngs)
    if kind == "V":
        return layers.GatedLinearAttention(d, h, gate_low_rank_dim=c.gla_gate_low_rank_dim, rngs=rngs)
    if kind == "L":
        return layers.LightningAttention(d, h, n_layers=c.n_layers, rngs=rngs)
    if kind == "N":
        return layers.LinearAttention(d, h, rngs=rngs)
    if kind == "M":
        return layers.Mamba2(d, d_state=c.mamba_d_state, d_conv=c.conv_size, expand=c.mamba_expand,
                             head_dim=c.mamba_head_dim, n_groups=c.mamba_n_groups, rngs=rngs)
    return layers.MoE(d, c.d_ff, c.n_experts, c.top_k, num_shared_experts=c.n_shared_experts, rngs=rngs)


@pytest.mark.parametrize("kind", list("AGVLNME"))
def test_resolved_widths_are_the_layers_own_defaults(kind):
    """block.py passes the config's resolved widths; with every width None they must build the
    same layer as the layer's own defaults do."""
    if kind == "E":
        built = _shapes(lambda: build_ffn("E", CONFIG, nnx.Rngs(0)))
    else:
        built = _shapes(lambda: build_mixer(kind, CONFIG, 0, nnx.Rngs(0)))
    assert built == _shapes(lambda: _standalone(kind, CONFIG))


def test_resolved_properties_read_the_fields_first():
    c = CONFIG.replace(n_kv_heads=2, head_dim=16, rotary_dim=8, linear_n_heads=2, linear_n_v_heads=4,
                       linear_head_dim=8, linear_head_v_dim=12, mamba_n_heads=3, mamba_norm_groups=3,
                       lightning_norm_eps=1e-3, d_expert=40, shared_d_ff=24)
    assert (c.resolved_n_kv_heads, c.resolved_head_dim, c.resolved_rotary_dim) == (2, 16, 8)
    assert (c.resolved_linear_n_heads, c.resolved_linear_n_v_heads) == (2, 4)
    assert c.linear_head_dims("G") == c.linear_head_dims("V") == c.linear_head_dims("N") == (8, 12)
    assert c.linear_head_dims("L") == (8, 8)  # Lightning's values are as wide as its keys
    assert (c.resolved_mamba_n_heads, c.mamba_d_inner, c.resolved_mamba_norm_groups) == (3, 48, 3)
    assert (c.resolved_lightning_norm_eps, c.resolved_d_expert, c.resolved_shared_d_ff) == (1e-3, 40, 24)
    # And unset, the defaults of the field docs: d_model / heads, GLA's halved keys, d_ff.
    assert (CONFIG.resolved_n_kv_heads, CONFIG.resolved_head_dim, CONFIG.resolved_rotary_dim) == (4, 24, 24)
    assert CONFIG.linear_head_dims("V") == (12, 24) and CONFIG.linear_head_dims("G") == (24, 24)
    assert (CONFIG.resolved_mamba_n_heads, CONFIG.mamba_d_inner) == (12, 192)
    assert (CONFIG.resolved_d_expert, CONFIG.resolved_shared_d_ff) == (CONFIG.d_ff, CONFIG.d_ff)


def test_an_uneven_default_is_a_value_error_naming_the_fields():
    c = ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match=r"d_model=100 must be a multiple of n_heads=3 when head_dim is None"):
        c.resolved_head_dim
    with pytest.raises(ValueError, match="n_heads=3"):
        LM(c, rngs=nnx.Rngs(0))
    mamba = ModelConfig(d_model=100, layer_pattern="M", ffn_pattern="-", mamba_head_dim=64)
    with pytest.raises(ValueError, match=r"mamba_expand·d_model=200 must be a multiple of mamba_head_dim=64"):
        mamba.resolved_mamba_n_heads
    with pytest.raises(ValueError, match=r"2·linear_n_heads=6"):
        ModelConfig(d_model=100, n_heads=3, head_dim=32).linear_head_dims("V")
    with pytest.raises(ValueError, match="mixer must be one of the linear mixers"):
        CONFIG.linear_head_dims("A")


def test_vocabularies_are_the_owners_tables():
    assert config_module.MLP_ACTIVATIONS is mlp.ACTIVATIONS
    assert set(mlp.ACTIVATIONS) == set(ops.moe.ACTIVATIONS)  # one field drives dense MLPs and experts
    assert config_module.ROUTERS is ops.moe.ROUTERS
    assert config_module.QK_NORM_SCOPES is attention.QK_NORM_SCOPES
    hints = typing.get_type_hints(ModelConfig)
    for name, table in (("mlp_activation", mlp.ACTIVATIONS), ("router", ops.moe.ROUTERS),
                        ("qk_norm_scope", attention.QK_NORM_SCOPES), ("dtype", config_module.DTYPES)):
        assert typing.get_args(hints[name]) == tuple(table), name
    for dtype in config_module.DTYPES:
        assert jax.numpy.dtype(dtype).name == dtype


def test_cli_choices_are_the_tables():
    assert typing.get_args(args.PresetName) == tuple(FAMILIES)
    assert typing.get_args(args.SizeName) == tuple(SIZES)
    assert typing.get_args(args.ScheduleName) == optimizer.SCHEDULES
    overrides = typing.get_type_hints(args.ModelOverrides)
    assert typing.get_args(overrides["router"]) == (typing.Literal[ops.moe.ROUTERS], type(None))
    parsed = args.parse_args(["--preset", "gla", "--size", "tiny", "--schedule", "wsd", "--model.router", "sigmoid"])
    assert (parsed.preset, parsed.size, parsed.schedule, parsed.model.router) == ("gla", "tiny", "wsd", "sigmoid")
    with pytest.raises(SystemExit):
        args.parse_args(["--model.router", "softmax"])
