"""Models and generation: every preset, tiny, float32, against its own full forward pass.

The mixer layers themselves are checked against step-by-step formulas in test_layer_mixers.py;
here the references are the model's full causal pass (a different code path: chunk forms and
masked attention over the whole row, no caches) and naive numpy sampling rules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.generate import generate, left_pad
from jaxlm.layers import LatentCache, RecurrentCache
from jaxlm.ops import KVCache
from jaxlm.models import LM, ModelConfig, count_params
from jaxlm.models.presets import FAMILIES, SIZES, TARGET_PARAMS, preset
from jaxlm.sampling import next_token, truncate_logits
from numerics import assert_close

MODEL_TOL = 1e-4  # the bound for prefill + decode against one full pass
B, T, PROMPT = 2, 12, 7


@functools.cache
def tiny_model(name: str) -> LM:
    return LM(preset(name, dtype="float32"), rngs=nnx.Rngs(0))


@functools.cache
def tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(1, 256, (B, T)).astype(np.int32)


@nnx.jit
def full_logits(model: LM, tokens, segment_ids):
    return model(tokens, segment_ids=segment_ids).logits


@nnx.jit
def cached_logits(model: LM, tokens, segment_ids, cache):
    out = model(tokens, segment_ids=segment_ids, cache=cache)
    return out.logits, out.cache


PRESETS = sorted(FAMILIES)


@pytest.mark.parametrize("name", PRESETS)
def test_prefill_then_decode_equals_full_pass(name):
    model, x = tiny_model(name), jnp.asarray(tokens())
    expected = full_logits(model, x, None)
    cache = model.init_cache(batch_size=B, max_len=T)
    logits, cache = cached_logits(model, x[:, :PROMPT], None, cache)
    outs = [logits]
    for t in range(PROMPT, T):
        logits, cache = cached_logits(model, x[:, t : t + 1], None, cache)
        outs.append(logits)
    assert_close(jnp.concatenate(outs, axis=1), expected, MODEL_TOL, name)


@pytest.mark.parametrize("name", PRESETS)
def test_greedy_generate_equals_argmax_of_full_passes(name):
    model, new = tiny_model(name), T - PROMPT
    prompt = tokens()[:, :PROMPT]
    got = np.asarray(generate(model, prompt, new))
    # Causality lets one [B, T] shape serve every step: later slots do not change earlier logits.
    row = np.zeros((B, T), np.int32)
    row[:, :PROMPT] = prompt
    for i in range(new):
        logits = np.asarray(full_logits(model, jnp.asarray(row), None))
        row[:, PROMPT + i] = logits[:, PROMPT + i - 1].argmax(-1)
    np.testing.assert_array_equal(got, row)


@pytest.mark.parametrize("name", PRESETS)
def test_packed_documents_equal_each_alone(name):
    """Row 0 packs documents of 5 and 7 tokens; rows of the documents alone are right-padded to
    T, which causality makes harmless."""
    model, x = tiny_model(name), tokens()
    packed = np.stack([x[0], x[1]])
    seg = np.zeros((B, T), np.int32)
    seg[0, 5:] = 1
    got = np.asarray(full_logits(model, jnp.asarray(packed), jnp.asarray(seg)))
    alone = np.zeros((B, T), np.int32)
    alone[0, :5], alone[1, :7] = x[0, :5], x[0, 5:]
    expected = np.asarray(full_logits(model, jnp.asarray(alone), None))
    assert_close(got[0, :5], expected[0, :5], MODEL_TOL, f"{name} document A")
    assert_close(got[0, 5:], expected[1, :7], MODEL_TOL, f"{name} document B")


@pytest.mark.parametrize("name", PRESETS)
def test_cache_sizes(name):
    model = tiny_model(name)
    short = jax.tree.map(jnp.shape, model.init_cache(batch_size=B, max_len=64))
    long = jax.tree.map(jnp.shape, model.init_cache(batch_size=B, max_len=4096))
    for kinds, block, s, l in zip(model.config.layer_kinds(), model.blocks, short, long):
        mixer = kinds[0]
        if mixer == "-":
            assert s is None and l is None
        elif mixer == "A":
            assert isinstance(l, KVCache) and l.k == (B, block.mixer.n_kv_heads, 4096, block.mixer.head_dim)
        elif mixer == "W":
            assert s == l and l.k[2] == model.config.window
        elif mixer == "C":  # the latent and the shared rotary key per slot, not keys and values per head
            dims = model.config.mla_dims()
            assert isinstance(l, LatentCache)
            assert (l.c_kv, l.k_rope) == ((B, 4096, dims["kv_lora_rank"]), (B, 4096, dims["qk_rope_head_dim"]))
        else:
            assert isinstance(l, RecurrentCache) and s == l


@pytest.mark.parametrize("name", ["transformer", "gdn_h1"])
def test_ragged_prompts_equal_each_prompt_alone(name):
    model = tiny_model(name)
    x = tokens()
    prompts = [x[0, :4], x[1, :PROMPT]]
    got = np.asarray(generate(model, prompts, 4))
    for i, p in enumerate(prompts):
        alone = np.asarray(generate(model, [p], 4))
        np.testing.assert_array_equal(got[i, -4:], alone[0, -4:])
    np.testing.assert_array_equal(got[0, : PROMPT - 4], 0)  # left padding


def test_eos_stops_a_row_and_fills_it():
    model = tiny_model("transformer")
    prompt = tokens()[:, :PROMPT]
    free = np.asarray(generate(model, prompt, 5))
    eos = int(free[0, PROMPT + 1])
    got = np.asarray(generate(model, prompt, 5, eos_id=eos))
    for r in range(B):
        cont = free[r, PROMPT:]
        hits = np.flatnonzero(cont == eos)
        stop = hits[0] if hits.size else len(cont)
        np.testing.assert_array_equal(got[r, PROMPT : PROMPT + stop + 1], cont[: stop + 1])
        assert np.all(got[r, PROMPT + stop :] == eos) or not hits.size


def test_streaming_callback_sees_every_token_in_order():
    model = tiny_model("gated_deltanet")
    seen = []
    out = generate(model, tokens()[:, :PROMPT], 4, on_token=lambda i, tok: seen.append((int(i), np.asarray(tok))))
    jax.effects_barrier()
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    np.testing.assert_array_equal(np.stack([t for _, t in seen], 1), np.asarray(out)[:, PROMPT:])


def test_sampling_is_seeded_and_follows_truncation():
    model = tiny_model("transformer")
    prompt = tokens()[:, :PROMPT]
    a = generate(model, prompt, 4, temperature=1.0, rng=jax.random.key(3))
    b = generate(model, prompt, 4, temperature=1.0, rng=jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    greedy = generate(model, prompt, 4)
    np.testing.assert_array_equal(generate(model, prompt, 4, temperature=1.0, top_k=1, rng=jax.random.key(5)), greedy)


def test_truncate_logits_against_numpy():
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    k, p = 7, 0.6
    got = np.asarray(truncate_logits(jnp.asarray(logits), k, p))
    for row, out in zip(logits, got):
        order = np.argsort(-row)
        probs = np.exp(row[order[:k]] - row[order[0]])
        probs /= probs.sum()
        keep = order[: int(np.searchsorted(np.cumsum(probs), p) + 1)]
        np.testing.assert_array_equal(np.flatnonzero(np.isfinite(out)), np.sort(keep))
        np.testing.assert_array_equal(out[keep], row[keep])


def test_sample_frequencies_follow_softmax():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda key: next_token(logits, key, temperature=1.0, top_k=None, top_p=None))(keys)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.015)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_count_within_ten_percent_of_the_size(name, size):
    n = count_params(preset(name, size))
    assert abs(n / TARGET_PARAMS[size] - 1) <= 0.10, f"{name} {size}: {n:,} parameters"


def test_count_params_counts_the_model():
    model = tiny_model("qwen3_next")
    by_hand = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(model) == count_params(model.config) == by_hand


def test_moe_aux_and_selection_bias():
    model = LM(preset("minimax", n_layers=2, use_selection_bias=True), rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens()))
    n_moe = sum(f == "E" for _, f in model.config.layer_kinds())
    assert out.aux["expert_counts"].shape == (n_moe, model.config.n_experts)
    assert int(out.aux["expert_counts"].sum()) == n_moe * B * T * model.config.top_k
    model.update_selection_bias(out.aux["expert_counts"], 0.1)
    bias = model.blocks[0].ffn.selection_bias[...]
    counts = np.asarray(out.aux["expert_counts"][0], np.float64)
    np.testing.assert_allclose(np.asarray(bias), 0.1 * np.sign(counts.mean() - counts), atol=1e-7)


def _numpy_load_balancing(logits: np.ndarray, experts: np.ndarray, num_experts: int) -> float:
    """E·Σ_i f_i·P_i: f_i the share of the [N, k] assignments on expert i, P_i the mean over the
    N tokens of expert i's softmax probability."""
    f = np.bincount(experts.ravel(), minlength=num_experts) / experts.size
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return num_experts * float(np.sum(f * p.mean(0)))


def test_load_balancing_loss_is_the_switch_formula_over_the_layers(monkeypatch):
    """aux's load_balancing_loss is the mean over the MoE layers of E·Σ f_i·P_i, computed here in
    numpy from the router logits and choices each layer made; it is exactly 1 when every router
    probability is uniform (1/E), whatever the choices."""
    from jaxlm.ops.moe import balancing

    seen = []
    original = balancing.load_balancing_loss

    def recording(logits, experts):
        seen.append((np.asarray(logits, np.float64), np.asarray(experts)))
        return original(logits, experts)

    monkeypatch.setattr(balancing, "load_balancing_loss", recording)
    model = LM(preset("minimax", n_layers=2), rngs=nnx.Rngs(0))
    n_experts = model.config.n_experts
    out = model(jnp.asarray(tokens()))  # eager, so that the recorded arrays are concrete
    assert len(seen) == 2
    expected = np.mean([_numpy_load_balancing(z, e, n_experts) for z, e in seen])
    assert float(out.aux["load_balancing_loss"]) == pytest.approx(expected, rel=1e-6)

    for block in model.blocks:
        block.ffn.router.kernel[...] = jnp.zeros_like(block.ffn.router.kernel[...])
    assert float(model(jnp.asarray(tokens())).aux["load_balancing_loss"]) == pytest.approx(1.0, rel=1e-6)


def test_load_balancing_loss_can_be_below_one():
    """Not a bound: with 2 experts and top-1, two tokens narrowly choosing expert 1 and one
    confidently choosing expert 0 give f = (1/3, 2/3) against P ≈ (0.65, 0.35), E·Σ f·P ≈ 0.90."""
    from jaxlm.ops import moe as moe_ops

    logits = np.array([[0.0, 0.1], [0.0, 0.1], [5.0, 0.0]], np.float32)
    experts = moe_ops.route(jnp.asarray(logits), 1).experts
    np.testing.assert_array_equal(np.asarray(experts)[:, 0], [1, 1, 0])
    expected = _numpy_load_balancing(logits.astype(np.float64), np.array([[1], [1], [0]]), 2)
    got = float(moe_ops.load_balancing_loss(jnp.asarray(logits), experts))
    assert got == pytest.approx(expected, rel=1e-6)
    assert got < 0.95


def test_remat_gives_the_same_gradients():
    def grads(remat: bool):
        model = LM(preset("gdn_h1", n_layers=2, remat=remat), rngs=nnx.Rngs(0))
        x = jnp.asarray(tokens())

        def loss(m):
            return jnp.mean(jax.nn.log_softmax(m(x).logits)[..., 0])

        return nnx.jit(nnx.grad(loss))(model)

    assert_close(nnx.state(grads(True), nnx.Param), nnx.state(grads(False), nnx.Param), 1e-6, "remat")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown preset 'gpt'.*transformer"):
        preset("gpt")
    with pytest.raises(ValueError, match="unknown size"):
        preset("transformer", "7b")
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['d_modle'\]"):
        preset("transformer", d_modle=64)
    with pytest.raises(ValueError, match="layer_pattern must be a non-empty string"):
        ModelConfig(layer_pattern="AX")
    with pytest.raises(ValueError, match="neither a mixer nor a feed-forward"):
        ModelConfig(layer_pattern="A-", ffn_pattern="D-")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelConfig(dtype="float8")
    with pytest.raises(ValueError, match="top_k=3 must be <= n_experts=2"):
        ModelConfig(n_experts=2, top_k=3)


def test_config_json_round_trip():
    config = preset("qwen3_next", "small")
    assert ModelConfig.from_json(config.to_json()) == config


def test_generate_errors():
    model = tiny_model("transformer")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokens(), 0)
    with pytest.raises(ValueError, match="rng is required"):
        generate(model, tokens(), 2, temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tokens(), 2, temperature=0.7, top_p=1.5, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [np.array([1, 2]), np.array([], np.int32)], 2)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, np.full((1, 3), 300, np.int32), 2)


def test_left_pad():
    tokens_, seg = left_pad([np.array([5, 6, 7]), np.array([9])])
    np.testing.assert_array_equal(tokens_, [[5, 6, 7], [0, 0, 9]])
    np.testing.assert_array_equal(seg, [[1, 1, 1], [0, 0, 1]])
