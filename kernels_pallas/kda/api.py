"""Kimi Delta Attention (the gated delta rule with a per-key-channel gate) as a forward and a
backward Pallas kernel joined by ``jax.custom_vjp``."""

from __future__ import annotations

from typing import Any

import jax

from kernels_pallas.chunked_driver import chunked_recurrence
from kernels_pallas.gla.forward import SUB
from kernels_pallas.kda.backward import backward_step
from kernels_pallas.kda.forward import forward_step
from kernels_pallas.recurrence_config import make_config

_run = chunked_recurrence("kda", forward_step, backward_step, n_diff_keys=4)


def kda(q: jax.Array, k: jax.Array, v: jax.Array, b: jax.Array, n: jax.Array, beta: jax.Array, s0: jax.Array, *,
        chunk: int, **options: Any) -> tuple[jax.Array, jax.Array]:
    """Chunked Kimi Delta Attention in the kernel layout (see kernels_pallas.recurrence_config).

    Per token: S <- Diag(exp(g_t)) S; S <- S + k_t (β_t (v_t − Sᵀk_t))ᵀ; o_t = Sᵀ q_t.

    Args:
      q (already scaled), k: [BH, T, K]; v: [BH, T, V]; all float32, T a multiple of ``chunk``,
        K and V powers of two >= 16.
      b: [BH, T, K] inclusive cumsum of the log gates within each chunk, per key channel, with
        the gates at resets zeroed; n: [BH, T, K] number of resets so far within the chunk, per
        channel (a reset clears that channel's row of the state before its token; a document
        start counts in every channel).
      beta: [BH, T, 1] write strengths.
      s0: [BH, K, V] start state.
      chunk (a multiple of the 16-token sub-block); options (block_v, interpret, driver,
        precision, num_warps, backend): see ``recurrence_config.make_config``; defaults from
        the current ``KernelSettings``.
    Returns:
      o [BH, T, V] and the final state [BH, K, V], float32. Differentiable in q, k, v, b, beta, s0.
    """
    cfg = make_config(chunk, v.shape[-1], **options)
    if cfg.chunk % SUB:
        raise ValueError(f"chunk must be a multiple of {SUB}, got {chunk}")
    for name, x, width in (("k", k, q.shape[-1]), ("b", b, q.shape[-1]), ("n", n, q.shape[-1]), ("beta", beta, 1)):
        if x.shape != (*q.shape[:2], width):
            raise ValueError(f"{name} must be [BH, T, {width}] = {(*q.shape[:2], width)} like q, got {x.shape}")
    return _run((q, k, b, beta, n), v, s0, cfg)
