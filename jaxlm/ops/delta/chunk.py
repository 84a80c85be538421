"""Chunk form of the delta rules: the WY/UT transform, one unit-lower-triangular inverse per chunk.

The gate is [B, C, H, 1] (a decay per head: Gated DeltaNet) or [B, C, H, K] (per key channel:
Kimi Delta Attention). Within a chunk of C tokens with start state S0, let decay(t <- s) be the
masked exp(b_t − b_s), a K-vector or a scalar (zero across a reset), and γ_t = decay(t <- start).
The state just before token t's update is diag(γ_t) S0 + Σ_{s<t} diag(decay(t <- s)) k_s u_sᵀ,
where u_t = β_t (v_t − (decayed state)ᵀ k_t) is what token t writes. Stacking the u_t as rows of
U gives a unit lower-triangular system:
  (I + A) U = diag(β) V − diag(β) (K ⊙ γ) S0,   A[t, s] = β_t Σ_c k_tc k_sc decay_c(t <- s)   (s < t)
so with T = (I + A)^{-1}, W = T diag(β) (K ⊙ γ) and U' = T diag(β) V (both free of S0):
  U   = U' − W S0
  o   = (Q ⊙ γ) S0 + P U           P[t, s] = Σ_c q_tc k_sc decay_c(t <- s) for s <= t
  S'  = diag(γ_C) S0 + Σ_s diag(decay(C <- s)) k_s u_sᵀ
A scalar gate factors the scores as (q_t·k_s) decay(t <- s); a per-channel one does not, and
its scores come from secondary chunking (ops.channel_scores), every decay a masked exp of a
difference that cannot overflow. ``prepare`` does the solve and keeps W, U' and the decays
(linear in T, like the inputs); ``advance`` and ``readout`` only need U = U' − W S, and
``readout`` rebuilds the C×C scores, so no quadratic intermediate outlives its chunk group.
They plug into ``run_chunked``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.channel_scores import channel_scores
from jaxlm.ops.gate_cumsum import chunk_cumsums, masked_decay
from jaxlm.typing import ChunkMatrix, ChunkValues, State

HIGHEST = "highest"


def _cumsums(x):
    """b, count [B, C, H, 1 or K]: the gate's reset-aware cumsums."""
    g, reset = x[3], x[5]
    return chunk_cumsums(g, reset[:, :, None, None] > 0)


def _scores(a, k, b, count, *, strict: bool):
    """Σ_c a_tc k_sc decay_c(t <- s) [B, t, s, H] for s <= t (s < t when strict)."""
    if b.shape[-1] != 1:
        return channel_scores(a, k, b, count, strict=strict)
    c = b.shape[1]
    mask = jnp.tril(jnp.ones((c, c), bool), -1 if strict else 0)[None, :, :, None, None]
    same = jnp.logical_and(mask, count[:, :, None] == count[:, None, :])
    decay = masked_decay(b[:, :, None], b[:, None, :], same)  # [B, t, s, H, 1]
    return jnp.einsum("bthk,bshk->btsh", a, k, precision=HIGHEST) * decay[..., 0]


def _unit_lower_inverse(a: jax.Array) -> jax.Array:
    """(I + A)^{-1} for A [..., C, C] strictly lower, by forward substitution one row at a time."""
    c = a.shape[-1]
    eye = jnp.eye(c, dtype=a.dtype)

    def step(y, t):
        # Rows >= t of y are still zero and A[t, s] = 0 for s >= t: this reads solved rows only.
        row = eye[t] - jnp.einsum("...s,...sj->...j", a[..., t, :], y, precision=HIGHEST)
        return jax.lax.dynamic_update_index_in_dim(y, row, t, axis=-2), None

    y, _ = jax.lax.scan(step, jnp.zeros_like(a), jnp.arange(c))
    return y


@jax.custom_vjp
def unit_lower_inverse(a: ChunkMatrix) -> ChunkMatrix:
    """(I + A)^{-1} for A [..., C, C] strictly lower triangular.

    Written as a scan of row updates rather than LAPACK's trsm: on XLA:CPU the trsm custom call
    inside the chunk loops deadlocked the backward pass at T=16384 (jax 0.10.2), and plain XLA
    ops run unchanged on every backend. The custom VJP, dA = −lower(Yᵀ dY Yᵀ), is three matmuls,
    so the backward pass never differentiates through the C-step scan.
    """
    return _unit_lower_inverse(a)


def _inverse_fwd(a):
    y = _unit_lower_inverse(a)
    return y, y


def _inverse_bwd(y, dy):
    yt = jnp.swapaxes(y, -1, -2)
    da = -jnp.einsum("...ij,...jk,...kl->...il", yt, dy, yt, precision=HIGHEST)
    return (jnp.tril(da, -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def prepare(x):
    """x = (q, k, v, g, beta, reset): q, k [B, C, H, K]; v [B, C, H, V]; g [B, C, H, 1 or K];
    beta [B, C, H]; reset [B, C] float 0/1.

    Returns aux = (w [B, C, H, K], u_prime [B, C, H, V], query_decay [B, C, H, 1 or K],
    k_to_end [B, C, H, K], chunk_decay [B, H, 1 or K]).
    """
    _, k, v, _, beta, _ = x
    dk = k.shape[-1]
    b, count = _cumsums(x)
    query_decay = masked_decay(b, 0.0, count == 0)  # γ_t

    # A is strictly lower: token t's own key enters u_t through β_t v_t only.
    a = beta[:, :, None] * _scores(k, k, b, count, strict=True)  # [B, t, s, H]
    rhs = jnp.concatenate([beta[..., None] * k * query_decay, beta[..., None] * v], axis=-1)
    # One inverse serves both right-hand sides, in float32.
    inverse = unit_lower_inverse(jnp.moveaxis(a, 3, 1))  # [B, H, t, s]
    solved = jnp.einsum("bhts,bshn->bthn", inverse, rhs, precision=HIGHEST)  # [B, C, H, K + V]
    w, u_prime = solved[..., :dk], solved[..., dk:]

    key_decay = masked_decay(b[:, -1:], b, count == count[:, -1:])  # decay(C <- s)
    chunk_decay = masked_decay(b[:, -1], 0.0, count[:, -1] == 0)  # γ_C
    return w, u_prime, query_decay, k * key_decay, chunk_decay


def _written(aux, s):
    """U = U' − W S: the values the chunk's tokens write, given its start state."""
    w, u_prime = aux[0], aux[1]
    return u_prime - jnp.einsum("bchk,bhkv->bchv", w, s, precision=HIGHEST)


def advance(aux: tuple, s: State) -> State:
    k_to_end, chunk_decay = aux[3], aux[4]
    u = _written(aux, s)
    return chunk_decay[..., None] * s + jnp.einsum("bchk,bchv->bhkv", k_to_end, u, precision=HIGHEST)


def readout(x: tuple, aux: tuple, s: State) -> ChunkValues:
    q, k = x[0], x[1]
    query_decay = aux[2]
    b, count = _cumsums(x)
    u = _written(aux, s)
    inter = jnp.einsum("bthk,bhkv->bthv", q * query_decay, s, precision=HIGHEST)
    return inter + jnp.einsum("btsh,bshv->bthv", _scores(q, k, b, count, strict=False), u, precision=HIGHEST)
