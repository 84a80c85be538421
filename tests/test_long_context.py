"""Prefill in pieces: one model call per piece, the cache passed from call to call, equals one call.

This is how experiments/long_context.py feeds a context of millions of tokens. It is checked here
for every mixer letter of ModelConfig (softmax attention, a sliding window shorter than a piece,
latent attention, Gated DeltaNet, DeltaNet, KDA, Mamba-2, GLA, Lightning, linear attention) and for a stack that mixes them with
MoE, mixer-only and feed-forward-only layers, on packed documents.

Two rows of T = 39 tokens, fed as three pieces of 13 (longer than the window of 6 and than the
chunk of 8, and not a multiple of it): row 0 holds documents of 20 and 19 tokens, row 1 of 31 and
8, so each row has a document that spans pieces and a document start inside a piece. (The cache API continues the cached
document at the first token of a call, so a document cannot start exactly at a piece boundary.)
The references are the model's uncached full pass (chunk forms and masked attention over the whole
row) for the logits, and one cached call over all 40 tokens for the final cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.models import LM, ModelConfig
from jaxlm.models.config import FFNS, MIXERS
from jaxlm.ops.attention import xla as attention_xla
from numerics import F32_OUT, assert_close
from test_models import cached_logits, full_logits

B, T = 2, 39
PIECES = (13, 13, 13)
BASE = dict(
    vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, window=6, chunk_size=8,
    mamba_head_dim=16, mamba_d_state=8, n_experts=4, top_k=2,
)
CASES = {
    "attention": dict(layer_pattern="A"),
    "sliding_window": dict(layer_pattern="W"),
    "latent_attention": dict(layer_pattern="C"),
    "gated_deltanet": dict(layer_pattern="G"),
    "deltanet": dict(layer_pattern="R"),
    "kda": dict(layer_pattern="K"),
    "mamba2": dict(layer_pattern="M"),
    "gla": dict(layer_pattern="V"),
    "lightning": dict(layer_pattern="L"),
    "linear_attention": dict(layer_pattern="N"),
    # Four layers, the cache passed through each: G+D, W+E, A alone, then an MoE-only layer.
    "hybrid_moe": dict(layer_pattern="GWA-", ffn_pattern="DE-E", n_layers=4),
}


def test_cases_cover_every_mixer_and_feed_forward():
    mixers = {c for case in CASES.values() for c in case["layer_pattern"]}
    ffns = {c for case in CASES.values() for c in case.get("ffn_pattern", "D")}
    assert (mixers, ffns) == (set(MIXERS), set(FFNS))


@functools.cache
def model(name: str) -> LM:
    """The case's model with its matrices scaled up from normal(0.02) to normal(0.1), so that the
    attention scores, gates and conv taps are far from uniform and a wrong mask shows."""
    m = LM(ModelConfig().replace(**{**BASE, **CASES[name]}), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    params = jax.tree.map(lambda p: p * 5.0 if p.ndim >= 2 else p, params)
    return nnx.merge(graphdef, params, rest)


@functools.cache
def inputs() -> tuple[jax.Array, jax.Array]:
    tokens = np.random.default_rng(0).integers(0, BASE["vocab_size"], (B, T)).astype(np.int32)
    segment_ids = np.zeros((B, T), np.int32)
    segment_ids[0, 20:] = 1
    segment_ids[1, 31:] = 1
    return jnp.asarray(tokens), jnp.asarray(segment_ids)


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_in_pieces_equals_one_call(name):
    m = model(name)
    tokens, segment_ids = inputs()
    cache = m.init_cache(batch_size=B, max_len=T)
    logits, start = [], 0
    for length in PIECES:
        piece = slice(start, start + length)
        out, cache = cached_logits(m, tokens[:, piece], segment_ids[:, piece], cache)
        logits.append(out)
        start += length
    assert start == T
    assert_close(jnp.concatenate(logits, axis=1), full_logits(m, tokens, segment_ids), F32_OUT, f"{name} logits")
    one_logits, one_cache = cached_logits(m, tokens, segment_ids, m.init_cache(batch_size=B, max_len=T))
    assert_close(one_logits, full_logits(m, tokens, segment_ids), F32_OUT, f"{name} one cached call")
    assert_close(cache, one_cache, F32_OUT, f"{name} final cache")


@pytest.mark.parametrize("name", ["attention", "sliding_window", "latent_attention", "hybrid_moe"])
def test_prefill_pieces_over_key_blocks_equal_the_full_pass(name, monkeypatch):
    """With cache blocks of 8 slots, every piece's softmax runs online over key blocks of the
    39-slot cache (of the 6-slot ring and the piece, with a window), as a piece over a cache of
    millions of slots does. Pieces of 16 and 23 tokens: shapes no other test traces, so the
    patched block size is the one compiled."""
    monkeypatch.setattr(attention_xla, "KEY_BLOCK", 8)
    m = model(name)
    tokens, segment_ids = inputs()
    cache = m.init_cache(batch_size=B, max_len=T)
    logits = []
    for piece in (slice(0, 16), slice(16, T)):
        out, cache = cached_logits(m, tokens[:, piece], segment_ids[:, piece], cache)
        logits.append(out)
    assert_close(jnp.concatenate(logits, axis=1), full_logits(m, tokens, segment_ids), F32_OUT, f"{name} logits")
