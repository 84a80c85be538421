"""Capacity-factor execution: each expert takes at most C assignments; the overflow is dropped.

Dimension letters: N tokens, k experts per token, D model width, E experts, C capacity.

C = ceil(capacity_factor · N·k / E). Slots are handed out first to every token's first choice,
in token order, then to every second choice, and so on (GShard's priority), so a token loses
its lower-ranked experts before another token loses its best one. A dropped assignment adds
nothing to the output. Dispatch and combine are one-hot einsums through an [E, C, D] buffer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlm.ops.moe.experts import batched_experts

_HIGHEST = jax.lax.Precision.HIGHEST


def check_capacity_factor(capacity_factor: float | None) -> None:
    if capacity_factor is None:
        return
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise ValueError(f"capacity_factor must be None or a positive float, got {capacity_factor!r}")
    if not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be None or a positive finite float, got {capacity_factor}")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor · num_tokens · top_k / num_experts), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_slots(experts: jax.Array, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Position of each assignment in its expert's buffer, and whether it fits.

    Args:
      experts: [N, k] int32 expert ids.
    Returns:
      slot [N, k] int32 (the number of higher-priority assignments to the same expert) and
      keep [N, k] bool (slot < capacity).
    """
    n, k = experts.shape
    # Priority order: slot-major (all first choices, then all second choices), tokens in order.
    onehot = jax.nn.one_hot(experts.T.reshape(-1), num_experts, dtype=jnp.int32)  # [k·N, E]
    earlier = jnp.cumsum(onehot, axis=0) - onehot
    slot = jnp.sum(earlier * onehot, axis=-1).reshape(k, n).T
    return slot, slot < capacity


def capacity_moe(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    slot: jax.Array,
    keep: jax.Array,
    w_gate: jax.Array | None,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    capacity: int,
    activation: str = "swiglu",
) -> jax.Array:
    """y_n = Σ_j keep[n, j] · weights[n, j] · expert_{experts[n, j]}(x_n), on one device.

    Args:
      x: [N, D]. weights: [N, k] float32. experts, slot: [N, k] int32. keep: [N, k] bool.
      w_gate (None for "relu2"), w_up: [E, D, F]; w_down: [E, F, D].
      capacity: C, the buffer rows per expert. activation: one of experts.ACTIVATIONS.
    Returns:
      [N, D] float32.
    """
    num_experts = w_up.shape[0]
    to_expert = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * keep[..., None]  # [N, k, E]
    to_slot = jax.nn.one_hot(slot, capacity, dtype=jnp.float32)  # [N, k, C]
    dispatch = jnp.einsum("nke,nkc->nec", to_expert, to_slot)  # 0/1: which slot holds token n
    combine = jnp.einsum("nke,nkc->nec", to_expert * weights[..., None], to_slot)
    buffers = jnp.einsum("nec,nd->ecd", dispatch.astype(x.dtype), x, precision=_HIGHEST)
    out = batched_experts(buffers, w_gate, w_up, w_down, activation=activation)  # [E, C, D]
    return jnp.einsum("nec,ecd->nd", combine, out, precision=_HIGHEST)
