"""The decoder-only language model: embedding, a stack of Blocks, a final norm and the head.

Dimension letters: B batch, T tokens in this call, D d_model, N vocabulary, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import layers
from jaxlm.models.block import Block
from jaxlm.models.config import ModelConfig


class LMOutput(NamedTuple):
    logits: jax.Array  # [B, T, N] float32
    cache: tuple | None  # one entry per layer (None for a feed-forward-only layer), or None
    aux: dict  # auxiliary losses and statistics; empty without MoE layers (see LM.__call__)


def _call_block(block: Block, x, segment_ids, cache):
    return block(x, segment_ids=segment_ids, cache=cache)


def _call_block_remat(block: Block, x, segment_ids, cache):
    """The block under jax.checkpoint, as a pure function of its state: the backward pass
    recomputes its activations. (A block never mutates itself, so nothing flows back.)"""
    graphdef, state = nnx.split(block)

    def run(state, x, segment_ids, cache):
        return nnx.merge(graphdef, state)(x, segment_ids=segment_ids, cache=cache)

    return jax.checkpoint(run)(state, x, segment_ids, cache)


class LM(nnx.Module):
    """``LM(config, rngs=nnx.Rngs(seed))``; ``model(tokens)`` -> LMOutput.

    The residual stream is float32 whatever ``config.dtype``: the layers compute in the compute
    dtype, and a bf16 sum over many layers would drop small updates.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a jaxlm.models.ModelConfig, got {type(config).__name__}")
        self.config = config
        dtypes = dict(dtype=config.compute_dtype, param_dtype=config.storage_dtype)
        self.embed = layers.Embedding(config.vocab_size, config.d_model, tie_output=config.tie_embeddings,
                                      **dtypes, rngs=rngs)
        self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.n_layers)])
        self.final_norm = layers.RMSNorm(config.d_model, eps=config.norm_eps,
                                         zero_centered=config.zero_centered_norm, **dtypes)

    def init_cache(self, *, batch_size: int, max_len: int) -> tuple:
        """A cache for ``batch_size`` rows and up to ``max_len`` tokens (prompt and continuation).

        Attention layers hold max_len KV slots (window slots for sliding-window layers);
        recurrent layers hold their state and conv state, whose size does not depend on max_len.
        """
        return tuple(block.init_cache(batch_size, max_len) for block in self.blocks)

    def __call__(
        self, tokens: jax.Array, *, segment_ids: jax.Array | None = None, cache: tuple | None = None
    ) -> LMOutput:
        """tokens: [B, T] ints. segment_ids: [B, T] ints of packed documents, or None.

        With a cache, T > 1 tokens prefill and T == 1 decodes one step; the first document of
        the call continues the cached one. ``aux`` with MoE layers holds load_balancing_loss and
        router_z_loss (means over MoE layers, coefficients not applied), dropped_fraction, and
        expert_counts [n_moe_layers, E].
        """
        self._check_inputs(tokens, segment_ids, cache)
        x = self.embed(tokens).astype(jnp.float32)
        run_block = _call_block_remat if self.config.remat else _call_block
        caches = [None] * len(self.blocks) if cache is None else list(cache)
        new_caches, moe_aux = [], []
        for block, layer_cache in zip(self.blocks, caches):
            x, layer_cache, aux = run_block(block, x, segment_ids, layer_cache)
            new_caches.append(layer_cache)
            if aux is not None:
                moe_aux.append(aux)
        logits = self.embed.logits(self.final_norm(x))
        return LMOutput(logits, None if cache is None else tuple(new_caches), _summarise(moe_aux))

    def update_selection_bias(self, expert_counts: jax.Array, rate: float) -> None:
        """One auxiliary-loss-free balancing step for every MoE layer; expert_counts as in aux."""
        moes = [b.ffn for b in self.blocks if b.ffn_kind == "E"]
        if expert_counts.shape[0] != len(moes):
            raise ValueError(f"expert_counts must have {len(moes)} rows (one per MoE layer), got {expert_counts.shape}")
        for i, moe in enumerate(moes):
            moe.update_selection_bias(expert_counts[i], rate)

    def _check_inputs(self, tokens, segment_ids, cache) -> None:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids of shape [B, T], got {tokens.dtype} {tokens.shape}")
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids must have the tokens' shape {tokens.shape}, got {segment_ids.shape}")
        if cache is not None and (not isinstance(cache, (tuple, list)) or len(cache) != len(self.blocks)):
            raise ValueError(f"cache must come from init_cache: a tuple of {len(self.blocks)} layer caches")


def _summarise(moe_aux: list) -> dict:
    if not moe_aux:
        return {}
    mean = lambda name: jnp.mean(jnp.stack([getattr(a, name) for a in moe_aux]))
    return {
        "load_balancing_loss": mean("load_balancing_loss"),
        "router_z_loss": mean("router_z_loss"),
        "dropped_fraction": mean("dropped_fraction"),
        "expert_counts": jnp.stack([a.expert_counts for a in moe_aux]),
    }


def count_params(model_or_config: LM | ModelConfig) -> int:
    """Number of trainable parameters (nnx.Param), without allocating them for a config."""
    if isinstance(model_or_config, ModelConfig):
        config = model_or_config
        model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    else:
        model = model_or_config
    params = nnx.state(model, nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(params)))
