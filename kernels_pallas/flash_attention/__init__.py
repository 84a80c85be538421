"""Causal/windowed/segmented flash attention in Pallas (TPU Mosaic, GPU Triton, CPU interpreter).

Files: ``api.py`` (entry point, padding, custom VJP), ``forward.py`` (online-softmax kernel),
``backward.py`` (dq and dk/dv kernels), ``tiles.py`` (masks, loop bounds, matmuls), ``config.py``
(block sizes and backend parameters).
"""

from kernels_pallas.flash_attention.api import flash_attention
from kernels_pallas.flash_attention.config import BlockSizes

__all__ = ["BlockSizes", "flash_attention"]
