"""Token mixers as pure functions: linear recurrences, softmax attention and the short conv.

See docs/architecture.md for shapes, gate conventions, impl forms and the numerics contract.
"""

from jaxlm.ops.attention import attention
from jaxlm.ops.conv import causal_conv1d
from jaxlm.ops.delta import delta_rule, gated_delta_rule
from jaxlm.ops.gla import gla, linear_attn, simple_gla

__all__ = ["attention", "causal_conv1d", "delta_rule", "gated_delta_rule", "gla", "linear_attn", "simple_gla"]
