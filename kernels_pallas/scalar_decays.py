"""The decays of one chunk for a per-head scalar gate (simple_gla and the delta rules)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.tile_math import col_ids, col_to_row, masked_exp, row_ids, take_row


class ScalarDecays(NamedTuple):
    """Masked decays of one chunk for a per-head scalar gate."""

    pair: jax.Array  # [C, C] decay(t <- s) for s <= t, 0 across a reset
    query: jax.Array  # [C, 1] decay(t <- chunk start)
    key: jax.Array  # [C, 1] decay(chunk end <- s)
    chunk: jax.Array  # [1, 1] decay(chunk end <- chunk start)


def scalar_decays(b: jax.Array, n: jax.Array) -> ScalarDecays:
    """b: [C, 1] chunk-local cumsum of the log gates (zero at resets); n: [C, 1] reset counts."""
    c = b.shape[0]
    b_row, n_row = col_to_row(b), col_to_row(n)
    keep = jnp.logical_and(row_ids((c, c)) >= col_ids((c, c)), n == n_row)
    b_end, n_end = take_row(b, c - 1), take_row(n, c - 1)
    return ScalarDecays(
        pair=masked_exp(b - b_row, keep),
        query=masked_exp(b, n == 0.0),
        key=masked_exp(b_end - b, n == n_end),
        chunk=masked_exp(b_end, n_end == 0.0),
    )
