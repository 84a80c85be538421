"""Token-by-token form of the delta rules: the reference and the decode path.

  S <- diag(exp(g_t)) S;   S <- S + k_t (β_t (v_t − Sᵀ k_t))ᵀ;   o_t = Sᵀ q_t

The gate is [B, T, HV, 1] for a decay per head (Gated DeltaNet) or [B, T, HV, K] for one per key
channel (Kimi Delta Attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.typing import Beta, HeadQK, Resets, State, TokenGate, Values


def delta_recurrent(
    q: HeadQK, k: HeadQK, v: Values, g: TokenGate, beta: Beta, reset: Resets, s0: State
) -> tuple[Values, State]:
    """q, k: [B, T, HV, K] (q already scaled); v: [B, T, HV, V]; g: [B, T, HV, 1 or K] and
    beta: [B, T, HV], float32 (g log decays);
    reset: [B, T] bool (state cleared before token t); s0: [B, HV, K, V] float32.

    Returns o [B, T, HV, V] float32 and the final state [B, HV, K, V].
    """

    def step(s, xs):
        q_t, k_t, v_t, g_t, beta_t, reset_t = xs
        s = jnp.where(reset_t[:, None, None, None], 0.0, s) * jnp.exp(g_t)[..., None]
        predicted = jnp.einsum("bhk,bhkv->bhv", k_t, s, precision="highest")
        u_t = beta_t[..., None] * (v_t - predicted)
        s = s + k_t[..., :, None] * u_t[..., None, :]
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t, s, precision="highest")
        return s, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, reset))
    s_final, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s_final
