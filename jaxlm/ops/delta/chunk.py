"""Chunk form of the gated delta rule: the WY/UT transform, one unit-lower-triangular inverse per chunk.

Within a chunk of C tokens with start state S0, let decay(t <- s) be the masked exp(b_t − b_s)
(zero across a reset) and γ_t = decay(t <- start). The state just before token t's update is
γ_t S0 + Σ_{s<t} decay(t <- s) k_s u_sᵀ, where u_t = β_t (v_t − (decayed state)ᵀ k_t) is what
token t writes. Stacking the u_t as rows of U gives a unit lower-triangular system:
  (I + A) U = diag(β) V − diag(β γ) K S0,   A[t, s] = β_t decay(t <- s) k_t·k_s   (s < t)
so with T = (I + A)^{-1}, W = T diag(βγ) K and U' = T diag(β) V (both free of S0):
  U   = U' − W S0
  o   = diag(γ) Q S0 + (Q Kᵀ ⊙ D) U           D[t, s] = decay(t <- s) for s <= t
  S'  = γ_C S0 + Σ_s decay(C <- s) k_s u_sᵀ
``prepare`` does the solve and keeps W, U' and the decays (linear in T, like the inputs);
``advance`` and ``readout`` only need U = U' − W S, and ``readout`` rebuilds the C×C scores, so
no quadratic intermediate outlives its chunk group. They plug into ``run_chunked``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.gate_cumsum import chunk_cumsums, masked_decay
from jaxlm.typing import ChunkMatrix, ChunkValues, State

HIGHEST = "highest"


def _decays(x):
    """b, count [B, C, H] (reset-aware cumsums) and decay(t <- s) [B, t, s, H] for s <= t."""
    g, reset = x[3], x[5]
    c = g.shape[1]
    b, count = chunk_cumsums(g, reset[:, :, None] > 0)
    causal = jnp.tril(jnp.ones((c, c), bool))[None, :, :, None]
    same = jnp.logical_and(causal, count[:, :, None] == count[:, None, :])
    return b, count, masked_decay(b[:, :, None], b[:, None, :], same)


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
    """x = (q, k, v, g, beta, reset): q, k [B, C, H, K]; v [B, C, H, V]; g, beta [B, C, H];
    reset [B, C] float 0/1.

    Returns aux = (w [B, C, H, K], u_prime [B, C, H, V], query_decay [B, C, H],
    k_to_end [B, C, H, K], chunk_decay [B, H]).
    """
    _, k, v, _, beta, _ = x
    c, dk = k.shape[1], k.shape[-1]
    b, count, decay = _decays(x)
    query_decay = masked_decay(b, 0.0, count == 0)  # γ_t

    # A is strictly lower: token t's own key enters u_t through β_t v_t only.
    strict = jnp.tril(jnp.ones((c, c), bool), -1)[None, :, :, None]
    kk = jnp.einsum("bthk,bshk->btsh", k, k, precision=HIGHEST)
    a = jnp.where(strict, beta[:, :, None] * kk * decay, 0.0)  # [B, t, s, H]
    rhs = jnp.concatenate([(beta * query_decay)[..., None] * k, beta[..., None] * v], axis=-1)
    # One inverse serves both right-hand sides, in float32.
    inverse = unit_lower_inverse(jnp.moveaxis(a, 3, 1))  # [B, H, t, s]
    solved = jnp.einsum("bhts,bshn->bthn", inverse, rhs, precision=HIGHEST)  # [B, C, H, K + V]
    w, u_prime = solved[..., :dk], solved[..., dk:]

    key_decay = masked_decay(b[:, -1:], b, count == count[:, -1:])  # decay(C <- s)
    chunk_decay = masked_decay(b[:, -1], 0.0, count[:, -1] == 0)  # γ_C
    return w, u_prime, query_decay, k * key_decay[..., None], chunk_decay


def _written(aux, s):
    """U = U' − W S: the values the chunk's tokens write, given its start state."""
    w, u_prime = aux[0], aux[1]
    return u_prime - jnp.einsum("bchk,bhkv->bchv", w, s, precision=HIGHEST)


def advance(aux: tuple, s: State) -> State:
    k_to_end, chunk_decay = aux[3], aux[4]
    u = _written(aux, s)
    return chunk_decay[:, :, None, None] * s + jnp.einsum("bchk,bchv->bhkv", k_to_end, u, precision=HIGHEST)


def readout(x: tuple, aux: tuple, s: State) -> ChunkValues:
    q, k = x[0], x[1]
    query_decay = aux[2]
    _, _, decay = _decays(x)
    scores = jnp.einsum("bthk,bshk->btsh", q, k, precision=HIGHEST) * decay
    u = _written(aux, s)
    inter = jnp.einsum("bthk,bhkv->bthv", q, s, precision=HIGHEST)
    return query_decay[..., None] * inter + jnp.einsum("btsh,bshv->bthv", scores, u, precision=HIGHEST)
