"""Reset-aware gate cumsums inside one chunk, shared by the chunk forms.

Within a chunk the decay from token s to token t >= s is exp(b_t - b_s) with b the inclusive
cumsum of the log gates, and it is zero when a reset (a document start, or a gate at or below
``RESET_LOG_DECAY``) lies in (s, t]. Resets are counted with a second cumsum, so "no reset in
(s, t]" is simply ``count_t == count_s``, and the gates at reset positions are zeroed before the
cumsum so that b never holds a huge value whose differences would cancel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxlm.ops.sequence import RESET_LOG_DECAY


def chunk_cumsums(g: jax.Array, reset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """g: [B, C, ...] log gates; reset: bool, broadcastable to g (document starts).

    Returns (b, count), both float32 [B, C, ...]: the cumsum of the gates with resets zeroed,
    and the number of resets at positions <= t within the chunk.
    """
    reset = jnp.logical_or(reset, g <= RESET_LOG_DECAY)
    b = jnp.cumsum(jnp.where(reset, 0.0, g), axis=1)
    count = jnp.cumsum(reset.astype(jnp.float32), axis=1)
    return b, count


def masked_decay(b_later: ArrayLike, b_earlier: ArrayLike, keep: jax.Array) -> jax.Array:
    """exp(b_later - b_earlier) where keep, else 0; the mask is applied before exp as well, so a
    masked entry never overflows nor sends a NaN into the gradient."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, b_later - b_earlier, 0.0)), 0.0)
