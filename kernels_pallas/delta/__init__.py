"""Gated delta rule and delta rule (g = 0) chunked kernel: UT/WY transform, blocked inverse."""

from kernels_pallas.delta.api import gated_delta_rule

__all__ = ["gated_delta_rule"]
