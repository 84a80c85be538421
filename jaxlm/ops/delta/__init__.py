"""Delta-rule recurrences: DeltaNet, Gated DeltaNet and Kimi Delta Attention."""

from jaxlm.ops.delta.api import delta_rule, gated_delta_rule, kda

__all__ = ["delta_rule", "gated_delta_rule", "kda"]
