"""Token-by-token form of the diagonal-gate recurrence: the reference and the decode path.

  S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ q_t

The gate is [B, T, HV, 1] for a scalar (per-head) gate or [B, T, HV, K] for a vector gate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.typing import HeadQK, Resets, State, TokenGate, Values


def diagonal_recurrent(
    q: HeadQK, k: HeadQK, v: Values, g: TokenGate, reset: Resets, s0: State
) -> tuple[Values, State]:
    """q, k: [B, T, HV, K]; v: [B, T, HV, V]; g: [B, T, HV, 1 or K] float32 log decays;
    reset: [B, T] bool (state cleared before token t); s0: [B, HV, K, V] float32.

    Returns o [B, T, HV, V] float32 and the final state [B, HV, K, V].
    """

    def step(s, xs):
        q_t, k_t, v_t, g_t, reset_t = xs
        s = jnp.where(reset_t[:, None, None, None], 0.0, s)
        s = s * jnp.exp(g_t)[..., None] + k_t[..., :, None] * v_t[..., None, :]
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t, s, precision="highest")
        return s, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, reset))
    s_final, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s_final
