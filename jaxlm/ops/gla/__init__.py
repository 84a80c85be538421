"""Diagonal-gate recurrences: linear attention, simple GLA (scalar gate) and GLA (vector gate)."""

from jaxlm.ops.gla.api import gla, linear_attn, simple_gla

__all__ = ["gla", "linear_attn", "simple_gla"]
