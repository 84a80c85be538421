"""Kimi Delta Attention (KDA): the gated delta rule with a per-key-channel gate; UT/WY transform
with a blocked inverse, secondary chunking for the per-channel decays."""

from kernels_pallas.kda.api import kda

__all__ = ["kda"]
