"""Token mixers as pure functions: linear recurrences, softmax attention and the short conv.

See docs/architecture.md for shapes, gate conventions, impl forms and the numerics contract.
"""

from jaxlm.ops.gla import gla, linear_attn, simple_gla

__all__ = ["gla", "linear_attn", "simple_gla"]
