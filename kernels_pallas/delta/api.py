"""Gated delta rule (and the delta rule, g = 0) as a forward and a backward Pallas kernel joined
by ``jax.custom_vjp``."""

from __future__ import annotations

from typing import Any

import jax

from kernels_pallas.chunked_driver import chunked_recurrence
from kernels_pallas.delta.backward import backward_step
from kernels_pallas.delta.forward import forward_step
from kernels_pallas.recurrence_config import make_config

_run = chunked_recurrence("delta", forward_step, backward_step, n_diff_keys=4)


def gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array, n: jax.Array, beta: jax.Array,
                     s0: jax.Array, *, chunk: int, **options: Any) -> tuple[jax.Array, jax.Array]:
    """Chunked gated delta rule in the kernel layout (see kernels_pallas.recurrence_config).

    Args:
      q (already scaled), k: [BH, T, K]; v: [BH, T, V]; all float32, T a multiple of ``chunk``,
        K and V powers of two >= 16.
      b: [BH, T, 1] inclusive cumsum of the log gates within each chunk, with the gates at
        resets zeroed (all zeros for the plain delta rule); n: [BH, T, 1] number of resets so far
        within the chunk (a reset clears the state before its token).
      beta: [BH, T, 1] write strengths.
      s0: [BH, K, V] start state.
      chunk; options (block_v, interpret, driver, precision, num_warps, backend): see
        ``recurrence_config.make_config``; defaults from the current ``KernelSettings``.
    Returns:
      o [BH, T, V] and the final state [BH, K, V], float32. Differentiable in q, k, v, b, beta, s0.
    """
    cfg = make_config(chunk, v.shape[-1], **options)
    return _run((q, k, b, beta, n), v, s0, cfg)
