"""The static configuration of one chunked-recurrence kernel call, and the input layout it assumes.

Layout. Every per-token array is ``[BH, T, D]`` float32 (batch and value heads flattened, T a
multiple of the chunk C, D a power of two >= 16); states are ``[BH, K, V]``. "Key-side" arrays
(q, k, gate cumsums, reset counts, beta) are read whole along D; "value-side" arrays (v, o and
their cotangents) are split into blocks of ``block_v`` columns, because every recurrence here
acts on the columns of the state independently. A program owns one (head, value block) pair.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
from jax import lax

from kernels_pallas.settings import DRIVERS, GPU_PRECISION, Interpret, current_settings, resolve_target
from kernels_pallas.tile_math import F32

MIN_TILE = 16  # smallest matmul side Triton accepts; chunks, sub-blocks and head dims are >= this
TPU_LANES = 128  # a TPU block's last dimension is a multiple of this, or the whole array's
GPU_BLOCK_V = 64


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class RecurrenceConfig(NamedTuple):
    """Static kernel settings (hashable: a ``custom_vjp`` non-differentiable argument)."""

    chunk: int  # tokens per chunk, a power of two >= 16
    block_v: int  # value columns per program, a power of two >= 16 dividing V
    interpret: Interpret  # False: compiled; True: the HLO interpreter; InterpretParams: TPU interpret mode
    driver: str  # "loop" or "grid" (chunked_driver.py)
    precision: Any  # lax precision or DotAlgorithmPreset of every in-kernel matmul
    num_warps: int  # Triton only
    num_stages: int  # Triton only
    backend: str  # "cpu", "gpu" or "tpu": the platform the kernel is built for


def make_config(
    chunk: int,
    v_dim: int,
    *,
    block_v: int | None = None,
    interpret: Interpret | None = None,
    driver: str | None = None,
    precision: Any = None,
    num_warps: int | None = None,
    backend: str | None = None,
) -> RecurrenceConfig:
    """The call's options where given, else the current ``KernelSettings``, else per target:
    CPU: the HLO interpreter, "loop", float32 matmuls. GPU: Triton, "loop", 64-column value blocks,
    3-pass TF32 matmuls. TPU (compiled or TPU interpret mode): "grid", whole value rows
    (lane-dense blocks), float32 matmuls."""
    settings = current_settings()
    target = resolve_target(backend, interpret)
    driver = settings.driver if driver is None else driver
    if driver is None:
        driver = "grid" if target.tpu_kernel else "loop"
    if block_v is None:
        block_v = settings.block_v or (GPU_BLOCK_V if target.backend == "gpu" else v_dim)
        block_v = min(v_dim, block_v)
    precision = settings.precision if precision is None else precision
    if precision is None:
        compiled_gpu = target.backend == "gpu" and target.interpret is False
        precision = GPU_PRECISION if compiled_gpu else lax.Precision.HIGHEST
    num_warps = settings.num_warps if num_warps is None else num_warps
    if not (is_power_of_two(chunk) and chunk >= MIN_TILE):
        raise ValueError(f"chunk must be a power of two >= {MIN_TILE}, got {chunk}")
    if not (is_power_of_two(block_v) and block_v >= MIN_TILE and v_dim % block_v == 0):
        raise ValueError(f"block_v must be a power of two >= {MIN_TILE} dividing V={v_dim}, got {block_v}")
    if target.tpu_kernel and block_v != v_dim and block_v % TPU_LANES:
        # A [C, block_v] block of a [BH, T, V] array breaks Mosaic's (8, 128) tiling.
        raise ValueError(f"block_v on TPU must be V={v_dim} or a multiple of {TPU_LANES}, got {block_v}")
    if driver not in DRIVERS:
        raise ValueError(f"driver must be one of {DRIVERS}, got {driver!r}")
    return RecurrenceConfig(
        chunk, block_v, target.interpret, driver, precision, num_warps, settings.num_stages, target.backend
    )


def check_layout(
    keys: Sequence[jax.Array], values: Sequence[jax.Array], s0: jax.Array, cfg: RecurrenceConfig
) -> None:
    """Shapes the kernels assume: [BH, T, D] float32 with T % C == 0 and D powers of two."""
    bh, t, dk = keys[0].shape
    dv = values[0].shape[-1]
    if t % cfg.chunk:
        raise ValueError(f"T={t} must be a multiple of the chunk {cfg.chunk}; pad first")
    for x in (*keys, *values):
        if x.dtype != F32 or x.shape[:2] != (bh, t):
            raise ValueError(f"per-token inputs must be float32 [BH={bh}, T={t}, D], got {x.dtype} {x.shape}")
    for name, d in (("K", dk), ("V", dv)):
        if not (is_power_of_two(d) and d >= MIN_TILE):
            raise ValueError(f"{name}={d} must be a power of two >= {MIN_TILE}; pad first")
    if s0.shape != (bh, dk, dv) or s0.dtype != F32:
        raise ValueError(f"s0 must be float32 [{bh}, {dk}, {dv}], got {s0.dtype} {s0.shape}")
