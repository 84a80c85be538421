"""Vector-gate chunked recurrence (GLA) as a forward and a backward Pallas kernel joined by
``jax.custom_vjp``."""

from __future__ import annotations

from typing import Any

import jax

from kernels_pallas.chunked_driver import chunked_recurrence
from kernels_pallas.gla.backward import backward_step
from kernels_pallas.gla.forward import SUB, forward_step
from kernels_pallas.recurrence_config import make_config

_run = chunked_recurrence("gla", forward_step, backward_step, n_diff_keys=3)


def gla(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array, n: jax.Array, s0: jax.Array, *, chunk: int,
        **options: Any) -> tuple[jax.Array, jax.Array]:
    """Chunked vector-gate recurrence in the kernel layout (see kernels_pallas.recurrence_config).

    Args:
      q (already scaled), k: [BH, T, K]; v: [BH, T, V]; all float32, T a multiple of ``chunk``,
        K and V powers of two >= 16.
      b: [BH, T, K] inclusive cumsum of the log gates within each chunk, per key channel, with
        the gates at resets zeroed; n: [BH, T, K] number of resets so far within the chunk, per
        channel (a document start counts in every channel).
      s0: [BH, K, V] start state.
      chunk (a multiple of the 16-token sub-block); options (block_v, interpret, driver,
        precision, num_warps, backend): see ``recurrence_config.make_config``; defaults from
        the current ``KernelSettings``.
    Returns:
      o [BH, T, V] and the final state [BH, K, V], float32. Differentiable in q, k, v, b, s0.
    """
    cfg = make_config(chunk, v.shape[-1], **options)
    if cfg.chunk % SUB:
        raise ValueError(f"chunk must be a multiple of {SUB}, got {chunk}")
    return _run((q, k, b, n), v, s0, cfg)
