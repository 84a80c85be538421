"""Delta-rule recurrences: DeltaNet and Gated DeltaNet."""

from jaxlm.ops.delta.api import delta_rule, gated_delta_rule

__all__ = ["delta_rule", "gated_delta_rule"]
