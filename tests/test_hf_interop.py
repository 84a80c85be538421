"""Hugging Face checkpoints: jaxlm.interop.hf against transformers itself.

Each architecture is a tiny random transformers model (hidden 64, vocab 128), its weights
randomised where transformers initialises zeros or identities (norms, A_log, dt_bias, D, biases),
saved with save_pretrained, loaded with ``hf.load`` and compared on float32 logits; ``hf.save``
must give back the same tensors, and a config transformers reads to the same model.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from jaxlm.generate import generate  # noqa: E402
from jaxlm.interop import hf  # noqa: E402
from jaxlm.models import LM, preset  # noqa: E402
from numerics import assert_close, rel_rms  # noqa: E402

TOL = 1e-4  # the bound on float32 logits against transformers
VOCAB, B, T = 128, 2, 13
ATTN = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
MAMBA = dict(mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2)

CONFIGS = {
    # GQA, tied embeddings.
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True,
                                                         rope_theta=5e4, **ATTN),
    # Per-head QK norm; one sliding-window layer of three.
    "Qwen3ForCausalLM": lambda: transformers.Qwen3Config(
        num_hidden_layers=3, head_dim=16, use_sliding_window=True, sliding_window=5,
        layer_types=["full_attention", "sliding_attention", "full_attention"], **ATTN),
    # Grouped B/C (2 groups of 4 heads) with the per-group gated norm; conv bias.
    "Mamba2ForCausalLM": lambda: transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, n_groups=2,
        eos_token_id=None),
    # Grouped value heads (2 per key head), partial rotary, gated attention, zero-centred norms, shared
    # expert with its gate, top-k renormalised; layer pattern G A with experts, then a dense MLP.
    "Qwen3NextForCausalLM": lambda: transformers.Qwen3NextConfig(
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1],
        partial_rotary_factor=0.5, **ATTN),
    # Softmax, top-2 of 4, renormalised.
    "MixtralForCausalLM": lambda: transformers.MixtralConfig(num_hidden_layers=2, num_local_experts=4, **ATTN),
    # Qwen3 attention, no renormalisation, a dense layer (decoder_sparse_step=2).
    "Qwen3MoeForCausalLM": lambda: transformers.Qwen3MoeConfig(
        num_hidden_layers=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        decoder_sparse_step=2, norm_topk_prob=False, **ATTN),
    # QK norm over the whole projections, top-k renormalised.
    "OlmoeForCausalLM": lambda: transformers.OlmoeConfig(
        num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, eos_token_id=None, **ATTN),
    # Layer pattern M E A D: Mamba-2 (grouped norm, 2 groups, d_inner 96 not a multiple of 64), squared-ReLU
    # experts with sigmoid routing, a selection bias, scaled gates and a shared expert; attention without
    # RoPE; a squared-ReLU MLP.
    "NemotronHForCausalLM": lambda: transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
        mamba_num_heads=6, mamba_head_dim=16, ssm_state_size=16, n_groups=2, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
        routed_scaling_factor=1.5),
    # Lightning then softmax attention, post-norm residuals with DeepNorm factors, Mixtral-style experts.
    "MiniMaxForCausalLM": lambda: transformers.MiniMaxConfig(
        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], head_dim=16, num_local_experts=4,
        full_attn_alpha_factor=1.7, linear_attn_alpha_factor=1.7, mlp_alpha_factor=1.7, full_attn_beta_factor=0.8,
        linear_attn_beta_factor=0.8, mlp_beta_factor=0.8, **ATTN),
    # Layer pattern K K K C: Kimi Delta Attention and NoPE latent attention with low-rank queries; a dense
    # first layer, then sigmoid-routed experts with a selection bias, renormalised and scaled (1.5), and a
    # shared expert; transformers' default rms_norm_eps (1e-5).
    "KimiLinearForCausalLM": lambda: transformers.KimiLinearConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"], mlp_layer_types=["dense"] + ["sparse"] * 3,
        linear_num_heads=2, linear_head_dim=16, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, routed_scaling_factor=1.5, pad_token_id=None,
        bos_token_id=None, eos_token_id=None),
}
ARCHS = list(CONFIGS)


def randomize(model, seed: int = 0) -> None:
    """Every parameter and buffer non-trivial: matrices normal(0, 1/fan_in), 1-D weights around 1,
    A in [1, e²], dt_bias around −1, D normal, routing score biases normal(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(torch.rand(p.shape, generator=g) * 2)
            elif leaf == "dt_bias":
                p.copy_(randn(p.shape) * 0.5 - 1)
            elif leaf == "D":
                p.copy_(randn(p.shape))
            elif p.ndim == 1:
                p.copy_(1 + 0.3 * randn(p.shape))
            else:
                p.copy_(randn(p.shape) / math.sqrt(p.shape[-1]))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(randn(buf.shape) * 0.1)


def tokens(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (B, T)).astype(np.int64)


@nnx.jit
def jax_logits(model: LM, x):
    return model(x).logits


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x)).logits.float().numpy()


class Checkpoint:
    """One architecture: the transformers model, its folder and the jaxlm model loaded from it."""

    def __init__(self, arch: str, folder):
        torch.manual_seed(0)
        config = CONFIGS[arch]()
        self.ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
        randomize(self.ref)
        self.folder = folder
        self.ref.save_pretrained(folder)
        self.model = hf.load(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache: dict[str, Checkpoint] = {}

    def get(arch: str) -> Checkpoint:
        if arch not in cache:
            cache[arch] = Checkpoint(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


def reload(folder):
    """``from_pretrained`` with every tensor copied into memory of its own.

    from_pretrained memory-maps model.safetensors, so the tensors keep the alignment of the data section,
    which starts after the JSON header: at byte 8 + 4208 of the Qwen3-Next checkpoint, 8 bytes past a
    16-byte boundary. On some CPUs torch's matrix-vector kernel sums in another order for a weight at
    such an address: Qwen3-Next's ``shared_expert_gate`` (a 64 → 1 Linear) then differs by an ulp, and
    the logits by ~2e-6, from the same weights in allocator-aligned memory (``from_config``). Whether it
    shows depends on the header's length and the CPU, not on the weights; the copies make the
    comparison depend on the weights alone.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model


def read_tensors(path) -> dict[str, np.ndarray]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).numpy() for k in f.keys()}


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, checkpoint):
    ck = checkpoint(arch)
    assert type(ck.ref).__name__ == arch
    x = tokens()
    want = torch_logits(ck.ref, x)
    got = np.asarray(jax_logits(ck.model, jnp.asarray(x, jnp.int32)))
    print(f"{arch}: relative RMS {rel_rms(got, want):.2e}")
    assert_close(got, want, TOL, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_round_trips_bit_exactly(arch, checkpoint, tmp_path):
    ck = checkpoint(arch)
    hf.save(ck.model, tmp_path)
    # Buffers transformers derives from the config (MiniMax's decays) are not written: it recomputes them.
    derived = hf.ARCHITECTURES[arch].ignored
    original = {k: v for k, v in read_tensors(ck.folder / "model.safetensors").items()
                if not any(re.search(p, k) for p in derived)}
    saved = read_tensors(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, array in original.items():
        assert saved[name].dtype == array.dtype and np.array_equal(saved[name], array), name
    # The written config.json describes the same model to transformers: reloaded the same way, jaxlm's
    # folder and the original give the same logits bit for bit.
    x = tokens(2)
    np.testing.assert_array_equal(torch_logits(reload(tmp_path), x), torch_logits(reload(ck.folder), x))


@pytest.mark.parametrize("arch", ["Qwen3NextForCausalLM", "Mamba2ForCausalLM", "KimiLinearForCausalLM"])
def test_greedy_generation_matches_transformers(arch, checkpoint):
    ck = checkpoint(arch)
    prompt, new = tokens(3)[:, :6], 8
    with torch.no_grad():
        want = ck.ref.generate(torch.as_tensor(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=0).numpy()
    got = np.asarray(generate(ck.model, prompt.astype(np.int32), new))
    np.testing.assert_array_equal(got, want)


def test_sharded_checkpoint_bf16_and_mesh(checkpoint, tmp_path):
    """A checkpoint in shards with an index loads the same; bfloat16 rounds each tensor once;
    a mesh with an ``expert`` axis splits the experts' leading axis and, without the fsdp and tensor
    axes, replicates the rest."""
    ck = checkpoint("MixtralForCausalLM")
    ck.ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    mesh = jax.make_mesh((4, 2), ("data", "expert"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    sharded = hf.load(tmp_path, mesh=mesh)
    moe = sharded.blocks[0].ffn
    assert moe.w_gate[...].sharding.spec == jax.P("expert", None, None)
    assert moe.router.kernel[...].sharding.spec == jax.P(None, None)
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(ck.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    half = hf.load(tmp_path, dtype="bfloat16")
    assert half.config.dtype == half.config.param_dtype == "bfloat16"
    for a, b in zip(jax.tree.leaves(nnx.state(half)), jax.tree.leaves(nnx.state(ck.model))):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))


@pytest.mark.parametrize(
    "name, arch, overrides",
    [
        ("qwen3_next", "Qwen3NextForCausalLM", dict(n_layers=2, layer_pattern="GA")),
        # Tied embeddings, which transformers' Kimi Linear writes as a head of its own.
        ("kimi_linear", "KimiLinearForCausalLM", dict(d_ff=96, linear_head_dim=16)),
    ],
)
def test_a_jaxlm_preset_saves_as_its_hf_architecture(tmp_path, name, arch, overrides):
    """A jaxlm model of a supported shape is written as that architecture and transformers
    computes the same logits from it."""
    config = preset(name, d_model=64, vocab_size=VOCAB, n_experts=4, d_expert=16, **overrides)
    model = LM(config, rngs=nnx.Rngs(0))
    hf.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens(4)
    assert_close(np.asarray(jax_logits(model, jnp.asarray(x, jnp.int32))), torch_logits(ref, x), TOL, "preset")


def _write_config(folder, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))


def llama_config(**overrides) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, **overrides}


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(architectures=["GPT2LMHeadModel"]), r"unsupported architecture \['GPT2LMHeadModel'\]; supported: Llama"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope scaling 'llama3' is not supported"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope scaling 'yarn'"),
        (dict(attention_bias=True), "attention_bias=True is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        # Two layers by transformers' defaults: KDA with a dense MLP, then KDA with experts.
        (dict(architectures=["KimiLinearForCausalLM"], num_expert_group=4, topk_group=2),
         r"KimiLinearForCausalLM: group-limited routing \(n_group=4, topk_group=2\) is not supported"),
        (dict(architectures=["KimiLinearForCausalLM"], moe_router_activation_func="softmax"),
         "moe_router_activation_func='softmax' is not supported; supported: 'sigmoid'"),
    ],
)
def test_unsupported_architectures_and_options_are_named(tmp_path, fields, message):
    _write_config(tmp_path, **llama_config(**fields))
    with pytest.raises(ValueError, match=message):
        hf.load(tmp_path)


def test_unsupported_options_of_other_architectures(tmp_path):
    qwen3 = {**llama_config(), "architectures": ["Qwen3ForCausalLM"], "layer_types": ["full_attention", "chunked"]}
    _write_config(tmp_path / "a", **qwen3)
    with pytest.raises(ValueError, match="layer type 'chunked' is not supported"):
        hf.load(tmp_path / "a")
    mamba = {"architectures": ["Mamba2ForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 1,
             "num_heads": 8, "head_dim": 16, "state_size": 16, "time_step_limit": [0.0, 2.0]}
    _write_config(tmp_path / "b", **mamba)
    with pytest.raises(ValueError, match=r"time_step_limit=\[0.0, 2.0\] is not supported"):
        hf.load(tmp_path / "b")
    olmoe = {**llama_config(), "architectures": ["OlmoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
             "clip_qkv": 8.0}
    _write_config(tmp_path / "c", **olmoe)
    with pytest.raises(ValueError, match="clip_qkv=8.0 is not supported"):
        hf.load(tmp_path / "c")


def test_checkpoint_gaps_are_errors(checkpoint, tmp_path):
    ck = checkpoint("LlamaForCausalLM")
    tensors = read_tensors(ck.folder / "model.safetensors")
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text((ck.folder / "config.json").read_text())
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="tensors this mapping does not use: model.layers.0.self_attn.q_proj.bias"):
        hf.load(tmp_path)
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks the tensors \['model.norm.weight'\]"):
        hf.load(tmp_path)


def test_kimi_linear_loads_moonshots_own_layout(checkpoint, tmp_path):
    """Moonshot's checkpoints keep the dense MLP under ``mlp.`` and give the layer pattern and KDA
    widths in linear_attn_config (1-indexed layers): the same model loads from them."""
    from safetensors.numpy import save_file

    ck = checkpoint("KimiLinearForCausalLM")
    tensors = read_tensors(ck.folder / "model.safetensors")
    moonshot = {k.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): v for k, v in tensors.items()}
    assert "model.layers.0.mlp.gate_proj.weight" in moonshot
    save_file(moonshot, tmp_path / "model.safetensors")
    config = json.loads((ck.folder / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim"):
        del config[key]
    config.update(linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 2,
                                      "head_dim": 16, "short_conv_kernel_size": 4},
                  first_k_dense_replace=1, moe_layer_freq=1, mla_use_nope=True, moe_router_activation_func="sigmoid")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = hf.load(tmp_path)
    assert model.config == ck.model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(ck.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_refuses_what_no_architecture_expresses(tmp_path):
    model = LM(preset("gla", d_model=64, n_layers=2, vocab_size=VOCAB), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no supported Hugging Face architecture expresses this config"):
        hf.save(model, tmp_path)
    with pytest.raises(ValueError, match="this model is not a Mamba2ForCausalLM"):
        hf.save(model, tmp_path, architecture="Mamba2ForCausalLM")


def test_convert_cli_writes_a_checkpoint_generation_can_load(checkpoint, tmp_path):
    """``python -m jaxlm.convert --from-hf DIR --out CKPT``: the parameters, the non-parameter
    variables (Nemotron-H's selection bias) and the tokenizer file come back unchanged."""
    from jaxlm import convert
    from jaxlm.training.checkpointing import load_trained_model

    ck = checkpoint("NemotronHForCausalLM")
    source = tmp_path / "hf"
    shutil.copytree(ck.folder, source)
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    convert.main(["--from-hf", str(source), "--out", str(tmp_path / "ckpt")])
    model, tokenizer = load_trained_model(tmp_path / "ckpt")
    assert model.config == ck.model.config
    assert tokenizer is not None and open(tokenizer).read() == '{"version": "1.0"}'
    want, got = nnx.state(ck.model), nnx.state(model)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(SystemExit, match="already exists"):
        convert.main(["--from-hf", str(source), "--out", str(tmp_path / "ckpt")])
