"""Per-tile pieces shared by the forward and backward kernels: masks, loop bounds, matmuls.

Positions are absolute: query row t and key column s of the unpadded sequence. A key is visible
to a query when it is a real key (s < kv_len), passes the causal/window test, and carries the
same segment id. Loop bounds skip whole tiles that causality or the window hide; tiles hidden
only by segment ids are still visited (and masked).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Masked scores: finite, so no inf - inf can appear, and exp(MASKED - m) underflows to 0.
MASKED = -0.7 * float(np.finfo(np.float32).max)

_HIGHEST = jax.lax.Precision.HIGHEST  # IEEE float32 on Triton; bf16 inputs stay bf16 MMAs


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """What hides a key from a query. q_len/kv_len: the real (unpadded) lengths."""

    causal: bool
    window: int | None
    q_len: int
    kv_len: int
    kv_padded: bool
    has_segments: bool


def visible(spec: MaskSpec, q_start, k_start, rows: int, cols: int, q_seg=None, kv_seg=None):
    """bool [rows, cols] for the tile at (q_start, k_start), or None when nothing is masked.

    q_seg: [rows, 1] and kv_seg: [1, cols] segment ids when spec.has_segments.
    """
    shape = (rows, cols)
    t = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    s = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    terms = []
    if spec.causal:
        terms.append(s <= t)
        if spec.window is not None:
            terms.append(t - s < spec.window)
    elif spec.window is not None:
        terms.append(t - s < spec.window)
        terms.append(s - t < spec.window)
    if spec.kv_padded:
        terms.append(s < spec.kv_len)
    if spec.has_segments:
        terms.append(q_seg == kv_seg)
    if not terms:
        return None
    mask = terms[0]
    for term in terms[1:]:
        mask = mask & term
    return mask


def _cdiv(a, b: int):
    # Non-negative a: lax.div truncates, which is floor here (Triton lowers it; // it may not).
    return jax.lax.div(a + (b - 1), b)


def kv_block_range(spec: MaskSpec, q_block, block_q: int, block_k: int):
    """[lo, hi) of the key tiles that query tile q_block can see, as int32 scalars."""
    first_q = q_block * block_q
    last_q = first_q + (block_q - 1)
    n_kv = -(-spec.kv_len // block_k)  # tiles holding real keys; all-padding tiles are skipped
    lo = np.int32(0)
    hi = np.int32(n_kv)
    if spec.window is not None:
        lo = jax.lax.div(jnp.maximum(first_q - (spec.window - 1), 0), block_k)
    if spec.causal:
        hi = jnp.minimum(hi, _cdiv(last_q + 1, block_k))
    elif spec.window is not None:
        hi = jnp.minimum(hi, _cdiv(last_q + spec.window, block_k))
    return lo, hi


def q_block_range(spec: MaskSpec, kv_block, block_q: int, block_k: int):
    """[lo, hi) of the query tiles that can see key tile kv_block, as int32 scalars."""
    first_k = kv_block * block_k
    last_k = first_k + (block_k - 1)
    n_q = -(-spec.q_len // block_q)  # tiles holding real queries (padded rows add nothing)
    lo = np.int32(0)
    hi = np.int32(n_q)
    if spec.causal:
        lo = jax.lax.div(first_k, block_q)
    elif spec.window is not None:
        lo = jax.lax.div(jnp.maximum(first_k - (spec.window - 1), 0), block_q)
    if spec.window is not None:
        hi = jnp.minimum(hi, _cdiv(last_k + spec.window, block_q))
    return lo, hi


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] @ b[n, k]ᵀ -> [m, n] float32."""
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] @ b [k, n] -> [m, n] float32; a is cast to b's dtype (bf16 MMAs for bf16 inputs)."""
    return jax.lax.dot(a.astype(b.dtype), b, precision=_HIGHEST, preferred_element_type=jnp.float32)
