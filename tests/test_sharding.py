"""Sharding from the parameters themselves: each layer names its parameters' axes where it
creates them (nnx metadata), and jaxlm.sharding maps the names to mesh axes through RULES."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm import axis_names, sharding
from jaxlm.layers import initializers
from jaxlm.models import FAMILIES, LM, preset
from numerics import F32_OUT, assert_close


def _specs(state, mesh) -> dict[str, P]:
    """{'blocks.0.mixer.o_proj.kernel': PartitionSpec} for an nnx.State."""
    flat = nnx.to_flat_state(sharding.state_shardings(state, mesh))
    return {".".join(map(str, path)): v.get_value().spec for path, v in flat}


def _abstract(config) -> LM:
    return nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_variable_of_every_preset_names_its_axes(family):
    for path, var in nnx.to_flat_state(nnx.state(_abstract(preset(family)))):
        axes = var.get_metadata().get(axis_names.METADATA_KEY)
        assert axes is not None, f"{family}: {'.'.join(map(str, path))} has no logical axes"
        assert len(axes) == var.get_value().ndim, f"{family}: {'.'.join(map(str, path))} {axes}"
        assert set(axes) <= set(axis_names.LOGICAL_AXES) | {None}


def test_square_output_projection_shards_its_heads_side():
    """n_heads·head_dim == d_model: o_proj [H·K, D] is square, and only its role tells the heads
    side (tensor, as its input is the heads-sharded attention output) from the d_model side (fsdp)."""
    config = preset("transformer")
    assert config.n_heads * config.resolved_head_dim == config.d_model
    mesh = sharding.make_mesh("fsdp=2,tensor=2")
    specs = _specs(nnx.state(_abstract(config), nnx.Param), mesh)
    attention = "blocks.0.mixer"
    assert specs[f"{attention}.o_proj.kernel"] == P("tensor", "fsdp")
    for name in ("q_proj", "k_proj", "v_proj"):
        assert specs[f"{attention}.{name}.kernel"] == P("fsdp", "tensor")
    assert specs["blocks.0.ffn.gate_proj.kernel"] == P("fsdp", "tensor")
    assert specs["blocks.0.ffn.down_proj.kernel"] == P("tensor", "fsdp")
    assert specs["embed.embedding"] == P("tensor", "fsdp")
    assert specs["blocks.0.mixer_norm.weight"] == P(None)


def test_experts_and_the_optimizer_moments_follow_the_parameters():
    config = preset("qwen3_next", n_layers=4)
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    _, params, _ = nnx.split(_abstract(config), nnx.Param, ...)
    specs = _specs(params, mesh)
    moe = "blocks.0.ffn"
    assert specs[f"{moe}.w_gate"] == specs[f"{moe}.w_up"] == P("expert", "fsdp", "tensor")
    assert specs[f"{moe}.w_down"] == P("expert", "tensor", "fsdp")
    assert specs[f"{moe}.router.kernel"] == P("fsdp", None)  # every token needs all the logits
    assert specs[f"{moe}.shared.down_proj.kernel"] == P("tensor", "fsdp")
    # The state of AdamW mirrors the parameters: its moments take their specs, its step count none.
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    shardings = sharding.state_shardings(opt_state, mesh)
    adam = shardings[0]
    for moment in (adam.mu, adam.nu):
        flat = {".".join(map(str, p)): v.get_value().spec for p, v in nnx.to_flat_state(moment)}
        assert flat == specs
    assert adam.count.spec == P()


def test_absent_indivisible_and_repeated_mesh_axes_stay_replicated():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"))  # no fsdp axis
    assert sharding.partition_spec(("embed", "heads"), (8, 8), mesh) == P(None, "tensor")
    assert sharding.partition_spec(("embed", "heads"), (8, 6), mesh) == P(None, None)  # 4 does not divide 6
    assert sharding.partition_spec(("heads", "mlp"), (8, 8), mesh) == P("tensor", None)  # tensor shards one axis
    ones = sharding.make_mesh(None)  # every axis but data of size 1
    assert sharding.partition_spec(("expert", "embed", "mlp"), (8, 8, 8), ones) == P(None, None, None)
    unnamed = {"w": nnx.Param(jnp.zeros((4, 4)))}  # a variable created without logical axes
    assert sharding.state_shardings(unnamed, sharding.make_mesh("tensor=2"))["w"].get_value().spec == P(None, None)


def test_rules_cover_the_logical_axes_and_leave_context_to_activations():
    assert set(sharding.RULES) == set(axis_names.LOGICAL_AXES)
    assert set(sharding.RULES.values()) <= set(axis_names.MESH_AXES)
    assert axis_names.CONTEXT not in sharding.RULES.values()
    mesh = sharding.make_mesh("context=2,tensor=2")
    assert mesh.axis_names == axis_names.MESH_AXES and mesh.shape["context"] == 2
    assert sharding.batch_shards(mesh) == 2  # data takes the remaining 2 devices; context splits no rows


def test_bad_logical_axes_are_value_errors():
    with pytest.raises(ValueError, match="axes must name each of 2 axes"):
        initializers.param(jnp.zeros((2, 3)), ("embed",))
    with pytest.raises(ValueError, match="axes must name each of 2 axes"):
        initializers.param(jnp.zeros((2, 3)), ("embed", "width"))
    bad = {"w": nnx.Param(jnp.zeros((2, 3)), logical_axes=("embed",))}
    with pytest.raises(ValueError, match="w: logical_axes must give each of 2 axes"):
        sharding.state_shardings(bad, sharding.make_mesh(None))


def test_sharded_forward_equals_one_device():
    """A hybrid with experts and a square attention projection, its parameters placed by the
    rules over fsdp × expert × tensor, gives the single-device logits."""
    config = preset("qwen3_next", n_layers=2, layer_pattern="GA")
    model = LM(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (4, 12)), jnp.int32)
    graphdef, state = nnx.split(model)
    forward = lambda s, t: nnx.merge(graphdef, s)(t).logits
    want = jax.jit(forward)(state, tokens)
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    with jax.set_mesh(mesh):
        placed = jax.device_put(state, sharding.state_shardings(state, mesh))
        got = jax.jit(forward)(placed, tokens)
    o_proj = placed["blocks"][1]["mixer"]["o_proj"]["kernel"].get_value()
    assert o_proj.shape == (config.d_model, config.d_model) and o_proj.sharding.spec == P("tensor", "fsdp")
    assert_close(got, want, F32_OUT, "logits over the mesh")
