"""Parallel-scan form of the diagonal-gate recurrence via ``lax.associative_scan``.

Each token is the affine map S -> a_t ⊙ S + k_t v_tᵀ with a_t = exp(g_t) (zero at a reset). Two
maps compose as (a1, b1) then (a2, b2) = (a1·a2, a2 ⊙ b1 + b2), which is associative, so a
log-depth scan gives every prefix state. It materialises a K×V state per token (memory T·K·V),
so it exists for study and as an independent check of exactness, not for speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.typing import HeadQK, Resets, State, TokenGate, Values


def _compose(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def diagonal_associative(
    q: HeadQK, k: HeadQK, v: Values, g: TokenGate, reset: Resets, s0: State
) -> tuple[Values, State]:
    """Same contract as ``diagonal_recurrent``."""
    decay = jnp.where(reset[:, :, None, None], 0.0, jnp.exp(g))[..., None]  # [B,T,HV,K|1,1]
    update = k[..., :, None] * v[..., None, :]  # [B,T,HV,K,V]
    decay_prefix, update_prefix = jax.lax.associative_scan(_compose, (decay, update), axis=1)
    states = decay_prefix * s0[:, None] + update_prefix
    o = jnp.einsum("bthk,bthkv->bthv", q, states, precision="highest")
    return o, states[:, -1]
