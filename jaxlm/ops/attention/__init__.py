"""Softmax attention: causal, sliding-window, grouped-query and packed-document masks."""

from jaxlm.ops.attention.api import attention

__all__ = ["attention"]
