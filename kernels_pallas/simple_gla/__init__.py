"""Scalar-gate chunked recurrence kernel: Mamba-2/SSD, RetNet, Lightning, linear attention."""

from kernels_pallas.simple_gla.api import simple_gla

__all__ = ["simple_gla"]
