"""Dropless execution: every (token, expert) assignment is computed, none is dropped.

Dimension letters: N tokens, k experts per token, D model width, E experts, M rows.

The N·k assignments are sorted by expert, so each expert's rows are one contiguous run; the
grouped experts (SwiGLU or relu², experts.py) run every run against its own expert's weights, and
the results are put back in token order and summed with the gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.dispatch import Impl
from jaxlm.ops.moe.experts import grouped_experts


def group_by_expert(ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Order that sorts rows by expert, and the size of each expert's run.

    Args:
      ids: [M] int32 expert of each row; an id equal to num_experts marks a row that goes to
        no expert: it sorts last and is counted in no group.
    Returns:
      order [M] (a stable argsort of ids) and group_sizes [E] int32.
    """
    order = jnp.argsort(ids, stable=True)
    return order, jnp.bincount(ids, length=num_experts).astype(jnp.int32)


def run_experts(
    rows: jax.Array,
    ids: jax.Array,
    w_gate: jax.Array | None,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    activation: str = "swiglu",
    impl: Impl = None,
) -> jax.Array:
    """rows: [M, D]; ids: [M] in [0, E] (E: no expert); w_gate (None for "relu2"), w_up:
    [E, D, F]; w_down: [E, F, D]. Returns [M, D] float32, row m the output of expert ids[m] on
    rows[m], and zero where ids[m] == E."""
    order, group_sizes = group_by_expert(ids, w_up.shape[0])
    out = grouped_experts(rows[order], w_gate, w_up, w_down, group_sizes, activation=activation, impl=impl)
    return jnp.zeros_like(out).at[order].set(out, unique_indices=True)


def dropless_moe(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    w_gate: jax.Array | None,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    activation: str = "swiglu",
    impl: Impl = None,
) -> jax.Array:
    """y_n = Σ_j weights[n, j] · expert_{experts[n, j]}(x_n), on one device.

    Args:
      x: [N, D]. weights: [N, k] float32 gates. experts: [N, k] int32 ids.
      w_gate (None for "relu2"), w_up: [E, D, F]; w_down: [E, F, D].
      activation: one of experts.ACTIVATIONS. impl: the grouped_experts form.
    Returns:
      [N, D] float32.
    """
    n, k = experts.shape
    flat = experts.reshape(-1)
    order, group_sizes = group_by_expert(flat, w_up.shape[0])
    # Assignment a belongs to token a // k, so the sorted rows are gathered straight from x.
    out = grouped_experts(x[order // k], w_gate, w_up, w_down, group_sizes, activation=activation, impl=impl)
    per_assignment = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    return jnp.einsum("nk,nkd->nd", weights, per_assignment.reshape(n, k, -1), precision=jax.lax.Precision.HIGHEST)
