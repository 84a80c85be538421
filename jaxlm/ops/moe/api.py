"""The MoE feed-forward as one pure function: route, measure the balance, run the experts.

Dimension letters: N tokens, D model width, E experts, F expert hidden width, k experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm.ops.dispatch import Impl
from jaxlm.ops.moe import balancing
from jaxlm.ops.moe.capacity import capacity_moe, capacity_slots, check_capacity_factor, expert_capacity
from jaxlm.ops.moe.dropless import dropless_moe
from jaxlm.ops.moe.expert_parallel import EXPERT_AXIS, active_mesh, expert_axis_size, expert_parallel_moe, place
from jaxlm.ops.moe.experts import check_activation, check_grouped_impl
from jaxlm.ops.moe.routing import check_router, route
from jaxlm.typing import DownWeights, ExpertBias, RouterLogits, Rows, UpWeights, no_type_check


class MoEAux(NamedTuple):
    """What the model and trainer need besides the output. The coefficients are theirs to apply."""

    load_balancing_loss: jax.Array  # [] float32, E·Σ f_i·P_i (1 when routing is uniform)
    router_z_loss: jax.Array  # [] float32, mean logsumexp(logits)²
    expert_counts: jax.Array  # [E] int32 assignments routed to each expert, before any drop
    dropped_fraction: jax.Array  # [] float32 share of the N·k assignments a capacity dropped


def check_top_k(top_k: int, num_experts: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")


def check_expert_split(num_experts: int, axis_size: int) -> None:
    if num_experts % axis_size:
        raise ValueError(
            f"num_experts={num_experts} must be divisible by the size of the mesh axis "
            f"'{EXPERT_AXIS}' ({axis_size}) to shard the experts over it"
        )


def _check_shapes(x, logits, w_gate, w_up, w_down, selection_bias, activation) -> None:
    if np.ndim(x) != 2:
        raise ValueError(f"x must have shape [N, D] (rank 2), got shape {np.shape(x)}")
    n, d = np.shape(x)
    if activation == "relu2":
        if w_gate is not None:
            raise ValueError(f"w_gate must be None for activation='relu2' (ungated experts), got {np.shape(w_gate)}")
        if np.ndim(w_up) != 3 or np.shape(w_up)[1] != d:
            raise ValueError(f"w_up must have shape [E, D={d}, F], got {np.shape(w_up)}")
        e, _, f = np.shape(w_up)
    else:
        if w_gate is None:
            raise ValueError(f"w_gate must have shape [E, D={d}, F] for activation={activation!r}, got None")
        if np.ndim(w_gate) != 3 or np.shape(w_gate)[1] != d:
            raise ValueError(f"w_gate must have shape [E, D={d}, F], got {np.shape(w_gate)}")
        e, _, f = np.shape(w_gate)
        if np.shape(w_up) != (e, d, f):
            raise ValueError(f"w_up must have shape [E={e}, D={d}, F={f}], got {np.shape(w_up)}")
    if np.shape(w_down) != (e, f, d):
        raise ValueError(f"w_down must have shape [E={e}, F={f}, D={d}], got {np.shape(w_down)}")
    if np.shape(logits) != (n, e):
        raise ValueError(f"logits must have shape [N={n}, E={e}], got {np.shape(logits)}")
    if selection_bias is not None and np.shape(selection_bias) != (e,):
        raise ValueError(f"selection_bias must have shape [E={e}], got {np.shape(selection_bias)}")


@no_type_check
def moe(
    x: Rows,
    logits: RouterLogits,
    w_gate: UpWeights | None,
    w_up: UpWeights,
    w_down: DownWeights,
    *,
    top_k: int,
    router: str = "softmax_topk",
    renormalize: bool = False,
    selection_bias: ExpertBias | None = None,
    capacity_factor: float | None = None,
    activation: str = "swiglu",
    impl: Impl = None,
) -> tuple[Rows, MoEAux]:
    """Routed experts: y_n = Σ_j gate[n, j] · expert_{e[n, j]}(x_n) over the kept assignments.

    Args:
      x: [N, D] tokens, in the compute dtype.
      logits: [N, E] router logits (float32 recommended: the choice is sensitive to rounding).
      w_gate, w_up: [E, D, F]; w_down: [E, F, D], in x's dtype. w_gate is None for "relu2".
      top_k: experts per token, in [1, E].
      router, renormalize, selection_bias: see routing.route.
      capacity_factor: None for dropless execution; otherwise each expert takes at most
        ceil(capacity_factor · N·k / E) assignments and the rest are dropped (capacity.py).
      activation: the expert, one of experts.ACTIVATIONS: "swiglu",
        (silu(x·W_gate) ⊙ x·W_up)·W_down, or "relu2", relu(x·W_up)²·W_down (Nemotron-H). Every
        execution path (dropless, capacity, expert-parallel) takes either.
      impl: the grouped-matmul form of dropless execution (experts.GROUPED_EXPERT_FORMS): a name,
        a sequence of names, or None for the platform default.
    Returns:
      y [N, D] in x's dtype, and MoEAux.

    Under ``jax.set_mesh`` the experts run under ``jax.shard_map`` (expert_parallel.py): sharded
    over the ``expert`` axis with all-to-all when it has size > 1, otherwise each device runs its
    own tokens. The result equals the single-device one.
    """
    check_activation(activation)
    _check_shapes(x, logits, w_gate, w_up, w_down, selection_bias, activation)
    num_tokens, num_experts = np.shape(logits)
    check_top_k(top_k, num_experts)
    check_router(router)
    check_capacity_factor(capacity_factor)
    check_grouped_impl(impl)
    check_expert_split(num_experts, expert_axis_size())

    routing = route(logits, top_k, router=router, renormalize=renormalize, selection_bias=selection_bias)
    experts = routing.experts
    capacity = None
    if capacity_factor is None:
        keep = jnp.ones(experts.shape, bool)
    else:
        capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        # Slots count over all tokens, so every device must see every token's choice (a small
        # [N, k] int gather when the tokens are sharded over Explicit axes).
        slot, keep = capacity_slots(place(experts, P()), num_experts, capacity)

    expert_weights = (w_gate, w_up, w_down)
    if active_mesh() is not None:
        y = expert_parallel_moe(
            x, routing.weights, experts, keep, *expert_weights, capacity=capacity, activation=activation, impl=impl
        )
    elif capacity is None:
        y = dropless_moe(x, routing.weights, experts, *expert_weights, activation=activation, impl=impl)
    else:
        y = capacity_moe(
            x, routing.weights, experts, slot, keep, *expert_weights, capacity=capacity, activation=activation
        )

    aux = MoEAux(
        load_balancing_loss=balancing.load_balancing_loss(logits, experts),
        router_z_loss=balancing.router_z_loss(logits),
        expert_counts=balancing.expert_counts(experts, num_experts),
        dropped_fraction=1.0 - jnp.mean(keep.astype(jnp.float32)),
    )
    return y.astype(x.dtype), aux
