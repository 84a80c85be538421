"""Rotary position embeddings (RoPE) as pure functions.

The "rotate half" layout of GPT-NeoX, Llama and Qwen: within the first ``rotary_dim`` channels
of a head, channel i pairs with channel i + rotary_dim/2 and the pair turns by the angle
position·θ^(−2i/rotary_dim). Channels past ``rotary_dim`` pass through unchanged (partial
rotary, as Qwen3-Next rotates a quarter of each head). Because every pair turns by an angle
linear in the position, the score q_t·k_s depends on t − s only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_rotary_dim(rotary_dim: int, head_dim: int) -> None:
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, np.integer)):
        raise ValueError(f"rotary_dim must be an int, got {rotary_dim!r}")
    if rotary_dim < 0 or rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int in [0, head_dim={head_dim}], got {rotary_dim}")


def rope_frequencies(rotary_dim: int, theta: float = 10000.0) -> jax.Array:
    """[rotary_dim // 2] float32 angular frequencies θ^(−2i/rotary_dim)."""
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    return jnp.asarray(theta**-exponents, jnp.float32)


def apply_rope(
    x: jax.Array, positions: jax.Array, *, theta: float = 10000.0, rotary_dim: int | None = None
) -> jax.Array:
    """Rotates the first rotary_dim channels of every head by its position.

    x: [B, T, H, K]. positions: [T] or [B, T] ints. rotary_dim: even, <= K; default K; 0 is a no-op.
    Returns x's shape and dtype; the rotation is computed in float32.
    """
    head_dim = x.shape[-1]
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    check_rotary_dim(rotary_dim, head_dim)
    if rotary_dim == 0:
        return x
    angles = jnp.asarray(positions, jnp.float32)[..., None] * rope_frequencies(rotary_dim, theta)
    angles = jnp.broadcast_to(angles, (x.shape[0], x.shape[1], rotary_dim // 2))[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)  # [B, T, 1, rotary_dim/2]
    xf = x.astype(jnp.float32)
    half = rotary_dim // 2
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
