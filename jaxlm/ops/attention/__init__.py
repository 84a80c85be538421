"""Softmax attention: causal, sliding-window, grouped-query and packed-document masks, over a
whole sequence (``attention``) or over a KV cache (``cached_attention``)."""

from jaxlm.ops.attention.api import ATTENTION_FORMS, attention
from jaxlm.ops.attention.cached import CACHED_ATTENTION_FORMS, KVCache, cached_attention

__all__ = ["ATTENTION_FORMS", "CACHED_ATTENTION_FORMS", "KVCache", "attention", "cached_attention"]
