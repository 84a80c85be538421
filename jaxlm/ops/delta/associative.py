"""Parallel-scan form of the delta rules via ``lax.associative_scan``.

Each token is the affine map S -> A_t S + B_t with
  A_t = (I − β_t k_t k_tᵀ) diag(exp(g_t))   (K×K; zero at a reset, which clears S_{t-1})
  B_t = β_t k_t v_tᵀ                  (K×V; kept at a reset: token t still writes)
Two maps compose as (A1, B1) then (A2, B2) = (A2 A1, A2 B1 + B2), which is associative, so a
log-depth scan gives every prefix state. It materialises a K×K transition and a K×V state per
token (memory T·K·K + T·K·V) and does K×K matmuls at every scan level, so it exists for study
and as an independent check of exactness, not for speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.typing import Beta, HeadQK, Resets, State, TokenGate, Values

HIGHEST = "highest"


def _compose(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    a = jnp.einsum("...ij,...jk->...ik", a2, a1, precision=HIGHEST)
    b = jnp.einsum("...ij,...jv->...iv", a2, b1, precision=HIGHEST) + b2
    return a, b


def delta_associative(
    q: HeadQK, k: HeadQK, v: Values, g: TokenGate, beta: Beta, reset: Resets, s0: State
) -> tuple[Values, State]:
    """Same contract as ``delta_recurrent``."""
    dk = k.shape[-1]
    keep = jnp.where(reset[:, :, None, None], 0.0, jnp.exp(g))  # [B, T, HV, 1 or K]
    outer = beta[..., None, None] * k[..., :, None] * k[..., None, :]  # [B, T, HV, K, K]
    # The decay scales the columns: it acts on S before the correction does.
    transition = (jnp.eye(dk, dtype=k.dtype) - outer) * keep[..., None, :]
    update = (beta[..., None] * k)[..., :, None] * v[..., None, :]  # [B, T, HV, K, V]
    a_prefix, b_prefix = jax.lax.associative_scan(_compose, (transition, update), axis=1)
    states = jnp.einsum("bthij,bhjv->bthiv", a_prefix, s0, precision=HIGHEST) + b_prefix
    o = jnp.einsum("bthk,bthkv->bthv", q, states, precision=HIGHEST)
    return o, states[:, -1]
