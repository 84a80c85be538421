"""Intra-chunk scores under a per-channel decay, by secondary chunking.

With a decay per key channel the score of query t on key s is
  A[t, s] = Σ_c a_tc k_sc decay_c(t <- s),
which does not factor into one matmul without dividing by decays that can underflow (or
multiplying by their inverses, which overflow for gates near −1e4). Formed directly it is a
[C, C, K] tensor per chunk, as much elementwise work per token as the recurrent form's state
update. The chunk is split into sub-chunks of ``SUB_CHUNK`` tokens instead:
  - a query in sub-chunk i and a key in an earlier sub-chunk factor through the boundary r_i
    just before sub-chunk i: (a_t ⊙ decay(t <- r_i)) · (k_s ⊙ decay(r_i <- s)), both factors
    at most 1, so the pair is one matmul;
  - only the diagonal sub-chunks form the [sub, sub, K] decay tensor.
The work per token falls from C·K exps to about (sub + C/sub)·K, plus matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.gate_cumsum import masked_decay

HIGHEST = "highest"
SUB_CHUNK = 16


def blocks(x: jax.Array, n: int) -> jax.Array:
    """[B, C, ...] -> [B, n, C/n, ...]."""
    return x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:])


def channel_score_blocks(
    a: jax.Array, k: jax.Array, b: jax.Array, count: jax.Array, *, strict: bool
) -> tuple[jax.Array, jax.Array | None]:
    """The scores Σ_c a_tc k_sc decay_c(t <- s) by sub-chunk: (diagonal [B, n, t, s, H], each
    sub-chunk's queries on its own keys, s <= t (s < t when strict); cross [B, n, t, C, H], its
    queries on the keys of earlier sub-chunks, 0 elsewhere, or None when n = 1).

    a, k: [B, C, H, K]; b, count: [B, C, H, K], the gate's reset-aware cumsums (gate_cumsum):
    decay_c(t <- s) = exp(b_tc − b_sc) where count_tc == count_sc, else 0. C is a power of two
    and n = C / min(SUB_CHUNK, C).
    """
    c = a.shape[1]
    sub = min(SUB_CHUNK, c)
    n = c // sub

    # Diagonal sub-chunks: the decay tensor itself.
    ab, kb, bb, cb = (blocks(x, n) for x in (a, k, b, count))
    causal = jnp.tril(jnp.ones((sub, sub), bool), -1 if strict else 0)[None, None, :, :, None, None]
    same = jnp.logical_and(causal, cb[:, :, :, None] == cb[:, :, None, :])
    decay = masked_decay(bb[:, :, :, None], bb[:, :, None, :], same)  # [B, n, t, s, H, K]
    diagonal = jnp.einsum("bithk,bishk,bitshk->bitsh", ab, kb, decay, precision=HIGHEST)
    if n == 1:
        return diagonal, None

    # Keys in earlier sub-chunks, through the boundary r_i = i·sub − 1 (sub-chunk 0 has none).
    ref = jnp.maximum(jnp.arange(n) * sub - 1, 0)
    b_ref, count_ref = b[:, ref], count[:, ref]  # [B, n, H, K]
    a_factor = ab * masked_decay(bb, b_ref[:, :, None], cb == count_ref[:, :, None])  # [B, n, sub, H, K]
    earlier = (jnp.arange(c)[None, :] < (jnp.arange(n) * sub)[:, None])[None, :, :, None, None]
    k_keep = jnp.logical_and(earlier, count_ref[:, :, None] == count[:, None])
    k_factor = k[:, None] * masked_decay(b_ref[:, :, None], b[:, None], k_keep)  # [B, n, C, H, K]
    return diagonal, jnp.einsum("bithk,bishk->bitsh", a_factor, k_factor, precision=HIGHEST)


def channel_scores(a: jax.Array, k: jax.Array, b: jax.Array, count: jax.Array, *, strict: bool) -> jax.Array:
    """Σ_c a_tc k_sc decay_c(t <- s) [B, t, s, H] for s <= t (s < t when strict), 0 elsewhere: the
    blocks of ``channel_score_blocks`` (same arguments) as one C×C matrix."""
    batch, c, h, _ = a.shape
    diagonal, cross = channel_score_blocks(a, k, b, count, strict=strict)
    if cross is None:
        return diagonal.reshape(batch, c, c, h)
    n = diagonal.shape[1]
    on_diagonal = jnp.einsum("bitsh,ij->bitjsh", diagonal, jnp.eye(n, dtype=diagonal.dtype))
    return (cross + on_diagonal.reshape(cross.shape)).reshape(batch, c, c, h)
