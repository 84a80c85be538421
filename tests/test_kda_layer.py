"""The Kimi Delta Attention layer against transformers' KimiLinearDeltaAttention, and the mixer
letters K (KDA) and C (MLA) of ModelConfig. The float64 formula, packing, prefill and decode
checks of the layer are in test_layer_mixers.py with every other mixer."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from jaxlm.layers import KimiDeltaAttention, MultiHeadLatentAttention
from jaxlm.layers.cache import RecurrentCache
from jaxlm.layers.mla import LatentCache
from jaxlm.models import LM, ModelConfig
from numerics import F32_OUT, assert_close
from test_layer_mixers import apply, randomize

D, H, K, B, T = 32, 2, 8, 2, 11


def hf_weights(layer: KimiDeltaAttention, torch) -> dict:
    """transformers' parameter names and [out, in] layouts of the layer's parameters."""
    w = {}
    for name in ("q_proj", "k_proj", "v_proj", "b_proj", "g_a_proj", "g_b_proj", "o_proj"):
        w[f"{name}.weight"] = np.asarray(getattr(layer, name).kernel[...]).T
    w["forget_gate.f_a_proj.weight"] = np.asarray(layer.f_a_proj.kernel[...]).T
    w["forget_gate.f_b_proj.weight"] = np.asarray(layer.f_b_proj.kernel[...]).T
    w["forget_gate.dt_bias"] = np.asarray(layer.dt_bias[...])
    w["forget_gate.A_log"] = np.asarray(layer.A_log[...]).reshape(1, 1, -1, 1)
    w["conv1d.weight"] = np.asarray(layer.conv_weight[...])[:, None, :]
    w["o_norm.weight"] = np.asarray(layer.o_norm.weight[...])
    return {k: torch.tensor(v) for k, v in w.items()}


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_matches_transformers(impl):
    """Parameters map one to one onto transformers' KimiLinearDeltaAttention and give its output
    (its torch fallback of fla's chunk kernel, float32), through jaxlm's chunk and recurrent forms."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.kimi_linear import modeling_kimi_linear as hf_module

    layer = KimiDeltaAttention(D, H, head_dim=K, chunk_size=4, impl=impl, rngs=nnx.Rngs(0))
    randomize(layer, 1)
    config = transformers.KimiLinearConfig(
        hidden_size=D, linear_num_heads=H, linear_head_dim=K, linear_conv_kernel_dim=4, num_hidden_layers=1,
        rms_norm_eps=layer.o_norm.eps,
    )
    hf = hf_module.KimiLinearDeltaAttention(config, 0)
    weights = hf_weights(layer, torch)
    assert set(weights) == {name for name, _ in hf.named_parameters()}
    hf.load_state_dict(weights)
    x = np.random.default_rng(2).standard_normal((B, T, D)).astype(np.float32)
    with torch.no_grad():
        expected = hf(torch.tensor(x)).numpy()
    assert_close(apply(layer, x)[0], expected, F32_OUT, f"KDA {impl}")


def test_mixer_letters_build_kda_and_mla_with_their_caches():
    config = ModelConfig(
        d_model=D, n_heads=H, n_layers=2, layer_pattern="KC", ffn_pattern="D", linear_head_dim=K,
        mla_kv_lora_rank=12, mla_qk_rope_head_dim=0, mla_rope_layout=None, chunk_size=4,
    )
    model = LM(config, rngs=nnx.Rngs(0))
    kda, mla = model.blocks[0].mixer, model.blocks[1].mixer
    assert isinstance(kda, KimiDeltaAttention) and (kda.head_dim, kda.head_v_dim) == (K, K)
    assert isinstance(mla, MultiHeadLatentAttention)
    assert (mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) == (12, 16, 0, 16)
    assert mla.rope_layout is None
    caches = model.init_cache(batch_size=1, max_len=8)
    assert isinstance(caches[0], RecurrentCache) and isinstance(caches[1], LatentCache)
    assert caches[1].c_kv.shape == (1, 8, 12)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(mla_kv_lora_rank=0), "mla_kv_lora_rank must be a positive int"),
        (dict(mla_qk_rope_head_dim=-1), "mla_qk_rope_head_dim must be None or an int >= 0"),
        (dict(mla_rope_layout="rotate"), "mla_rope_layout must be one of"),
        (dict(layer_pattern="C", mla_qk_rope_head_dim=3), "must be even for RoPE"),
    ],
)
def test_bad_mla_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)
