"""Helpers over the time axis: segment boundaries, padding, chunking and head grouping.

Arrays are [B, T, ...] on entry; chunked arrays are [N, B, C, ...] with the chunk axis first
so that ``lax.scan`` walks over chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.typing import Resets, SegmentIds

# A log decay at or below this is treated as a full reset by the chunk form: exp(-30) ~ 1e-13
# is below float32 resolution relative to the current token's own term, and restarting the gate
# cumsum there keeps later differences b_t - b_s exact instead of cancelling two huge numbers.
RESET_LOG_DECAY = -30.0


def segment_starts(segment_ids: SegmentIds | None, batch: int, length: int) -> Resets:
    """[B, T] bool: True at t > 0 where a new document begins. The first token never resets,
    so that ``initial_state`` applies to the first segment of each row."""
    if segment_ids is None:
        return jnp.zeros((batch, length), bool)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((batch, 1), bool), change], axis=1)


DEFAULT_CHUNK_SIZE = 64
# KDA's XLA chunk form on CPU runs fastest at 16-token chunks: above that, the matmuls between
# sub-chunks cost more than the state passes they replace (experiments/RESULTS.md, issue 16).
KDA_CPU_CHUNK_SIZE = 16


def default_chunk_size(chunk_size: int | None, *, kda_chunk_form: bool = False) -> int:
    """``chunk_size``, or where it is None the default: 64, and 16 for KDA's chunk form on CPU."""
    if chunk_size is not None:
        return chunk_size
    if kda_chunk_form and jax.default_backend() == "cpu":
        return KDA_CPU_CHUNK_SIZE
    return DEFAULT_CHUNK_SIZE


def effective_chunk_size(chunk_size: int | None, length: int) -> int:
    """The chunk size actually used: ``chunk_size`` (None: the default), no larger than the next
    power of two above T."""
    return min(default_chunk_size(chunk_size), 1 << max(0, (length - 1).bit_length()))


def pad_time(x: jax.Array, multiple: int, value=0) -> jax.Array:
    """Pads axis 1 at the end up to a multiple of ``multiple``."""
    extra = (-x.shape[1]) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] with T a multiple of chunk -> [N, B, C, ...]."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def from_chunks(x: jax.Array) -> jax.Array:
    """[N, B, C, ...] -> [B, N*C, ...]."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def repeat_heads(x: jax.Array, groups: int) -> jax.Array:
    """[B, T, H, ...] -> [B, T, H*groups, ...]; value head j reads head j // groups."""
    return x if groups == 1 else jnp.repeat(x, groups, axis=2)
