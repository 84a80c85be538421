"""Token mixers as pure functions: linear recurrences, softmax attention and the short conv.

See docs/architecture.md for shapes, gate conventions, impl forms and the numerics contract.
"""

from jaxlm.ops.attention import KVCache, attention, cached_attention
from jaxlm.ops.checked import checked
from jaxlm.ops.conv import causal_conv1d
from jaxlm.ops.delta import delta_rule, gated_delta_rule, kda
from jaxlm.ops.dispatch import FormUnavailable
from jaxlm.ops.gla import gla, linear_attn, simple_gla

__all__ = [
    "FormUnavailable", "KVCache", "attention", "cached_attention", "causal_conv1d", "checked", "delta_rule",
    "gated_delta_rule", "gla", "kda", "linear_attn", "simple_gla",
]
