"""Block sizes and backend choices for the flash-attention kernels, by ``settings.Target``.

Every block size is a power of two of at least 16 (Triton's matmul minimum); on TPU the key
block is also the lane dimension of the score tile and of the key segment ids, so it is at
least 128 there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.settings import Target

MAX_HEAD_DIM = 256
TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per tile. block_q/block_k: the forward kernel; *_bwd: both backward kernels."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int

    def __post_init__(self) -> None:
        for name, size in dataclasses.asdict(self).items():
            if not isinstance(size, int) or size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size!r}")


# Starting points, not tuned on hardware: FlashAttention-2's Triton tiles for head dims <= 128,
# halved above that so the float32 accumulators of a D=256 tile still fit in registers/VMEM.
_GPU = BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)
_GPU_WIDE = BlockSizes(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32)
_TPU = BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
# Interpret mode runs every tile as a loop step on the host: big tiles mean few steps.
INTERPRET_BLOCKS = BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)


def default_block_sizes(head_dim: int, target: Target) -> BlockSizes:
    """The tiles used when the caller names none, by target and (padded) head dim."""
    if target.hlo_interpreter:
        return INTERPRET_BLOCKS
    if target.backend == "tpu":
        return _TPU
    return _GPU if head_dim <= 128 else _GPU_WIDE


def min_block(target: Target) -> int:
    """The smallest tile a block may shrink to for a short sequence."""
    return TPU_LANES if target.tpu_kernel else 16


def check_tpu_blocks(blocks: BlockSizes, target: Target) -> None:
    """The TPU kernel's key tiles are the lanes of the score tile and of the key segment ids."""
    if target.tpu_kernel and (blocks.block_k % TPU_LANES or blocks.block_k_bwd % TPU_LANES):
        raise ValueError(f"block_sizes: block_k and block_k_bwd must be multiples of {TPU_LANES} on TPU, got {blocks}")


def fit_block(block: int, length: int, floor: int) -> int:
    """block, shrunk to the next power of two at or above length (never below floor)."""
    return min(block, max(floor, 1 << max(0, (length - 1).bit_length())))


def padded_head_dim(dim: int) -> int:
    """Head dims are zero-padded to a power of two >= 16, which every backend can tile."""
    return max(16, 1 << max(0, (dim - 1).bit_length()))


def token_major(target: Target) -> bool:
    """Tile layout (layout.py): compiled GPU kernels read [B, T, H, D] in place; TPU and the
    interpreters use head-major [B, H, T, D]."""
    return target.backend == "gpu" and target.interpret is False


def compiler_params(target: Target, head_dim: int) -> Any:
    """Backend compiler parameters for a 3-D grid of independent programs (None for the HLO
    interpreter; TPU interpret mode reads the Mosaic ones)."""
    if target.hlo_interpreter:
        return None
    if target.backend == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    if target.backend == "gpu":
        return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    return None
