"""Plain DeltaNet, GatedDeltaNet(decay=False): the gated layer with a zero decay, and the config,
parameters and FLOPs of the mixer letter R.

The layer's formula, packed-document and decode tests are those of every mixer, in
tests/test_layer_mixers.py (its LAYERS["deltanet"]); this file adds what is DeltaNet's own."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.layers.gated_deltanet import GatedDeltaNet
from jaxlm.models import LM, MIXERS, ModelConfig
from jaxlm.models.block import build_mixer
from jaxlm.models.flops import delta_chunk_flops, flops_breakdown
from numerics import F32_OUT, assert_close
from test_layer_mixers import D_MODEL, apply, scenario


def test_deltanet_is_gated_deltanet_with_a_zero_decay():
    """With A_log = -inf the gated layer's g is -0·softplus(...) = 0: no decay, so given the same
    shared parameters it must give DeltaNet's outputs."""
    layer, x, seg, y = scenario("deltanet")
    gated = GatedDeltaNet(D_MODEL, 2, head_dim=8, n_v_heads=4, head_v_dim=6, chunk_size=4, rngs=nnx.Rngs(0))
    shared = nnx.state(layer, nnx.Param)
    nnx.update(gated, shared)
    gated.A_log[...] = jnp.full_like(gated.A_log[...], -jnp.inf)
    y_gated, _ = apply(gated, x, seg)
    assert_close(np.asarray(y_gated), y, F32_OUT, "gated deltanet with no decay")


def test_mixer_letter_R_builds_deltanet_without_decay_parameters():
    config = ModelConfig(d_model=32, n_heads=2, layer_pattern="RG", ffn_pattern="-", n_layers=2)
    assert "R" in MIXERS
    r, g = build_mixer("R", config, 0, nnx.Rngs(0)), build_mixer("G", config, 1, nnx.Rngs(0))
    assert isinstance(r, GatedDeltaNet) and not r.decay and g.decay
    assert r.a_proj is None and r.A_log is None and r.dt_bias is None
    names = lambda m: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assert names(g) - names(r) == {"a_proj.kernel", "A_log", "dt_bias"}
    assert names(r) < names(g)
    model = LM(config, rngs=nnx.Rngs(0))
    assert [b.mixer.decay for b in model.blocks] == [False, True]


def test_deltanet_flops_count_its_parameters():
    """2 × every projection kernel (no decay projection), the conv, and the delta chunk form."""
    config = ModelConfig(d_model=32, n_heads=2, layer_pattern="R", ffn_pattern="-", n_layers=1, chunk_size=16)
    layer = build_mixer("R", config, 0, nnx.Rngs(0))
    kernels = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param)) if p[-1] == "kernel")
    parts = flops_breakdown(config, 64)
    assert parts["dense_matmuls"] == 2 * kernels
    assert parts["conv"] == 2 * int(np.prod(layer.conv_weight.shape))
    assert parts["recurrence_mixing"] == 2 * delta_chunk_flops(16, 16, 16)
    gated = flops_breakdown(config.replace(layer_pattern="G"), 64)
    assert gated["dense_matmuls"] - parts["dense_matmuls"] == 2 * 32 * 2  # a_proj [D, HV]
