"""Vector-gate (GLA) chunked recurrence kernel with secondary chunking."""

from kernels_pallas.gla.api import gla

__all__ = ["gla"]
