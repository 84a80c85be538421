"""Mixture-of-Experts as pure functions: routing, balancing, and three ways to run the experts.

| file | concept |
|---|---|
| `routing.py` | router scores (softmax→top-k, top-k→softmax, sigmoid), renormalisation, selection bias |
| `balancing.py` | load-balancing loss, router z-loss, expert counts, the selection-bias update |
| `experts.py` | the expert, SwiGLU or relu² (ungated): single, batched over equal buffers, grouped over sorted rows |
| `dropless.py` | sort assignments by expert, grouped experts, unsort, combine with the gates |
| `capacity.py` | capacity C, slot assignment with drops, einsum dispatch and combine |
| `expert_parallel.py` | the `jax.shard_map` path: experts over the mesh axis `expert`, all-to-all |
| `api.py` | `moe`: validation, routing, aux values, choice of execution path |
"""

from jaxlm.ops.moe.api import MoEAux, check_expert_split, check_top_k, moe
from jaxlm.ops.moe.balancing import expert_counts, load_balancing_loss, router_z_loss, update_selection_bias
from jaxlm.ops.moe.capacity import capacity_moe, capacity_slots, check_capacity_factor, expert_capacity
from jaxlm.ops.moe.dropless import dropless_moe
from jaxlm.ops.moe.expert_parallel import EXPERT_AXIS, expert_axis_size, expert_parallel_moe
from jaxlm.ops.moe.experts import (
    ACTIVATIONS,
    GROUPED_EXPERT_FORMS,
    GROUPED_IMPLS,
    batched_experts,
    check_activation,
    check_grouped_impl,
    expert,
    grouped_experts,
    grouped_swiglu,
    swiglu,
)
from jaxlm.ops.moe.routing import ROUTERS, Routing, check_router, route

__all__ = [
    "ACTIVATIONS",
    "EXPERT_AXIS",
    "GROUPED_EXPERT_FORMS",
    "GROUPED_IMPLS",
    "ROUTERS",
    "MoEAux",
    "Routing",
    "batched_experts",
    "capacity_moe",
    "capacity_slots",
    "check_activation",
    "check_capacity_factor",
    "check_expert_split",
    "check_grouped_impl",
    "check_router",
    "check_top_k",
    "dropless_moe",
    "expert",
    "expert_axis_size",
    "expert_capacity",
    "expert_parallel_moe",
    "expert_counts",
    "grouped_experts",
    "grouped_swiglu",
    "load_balancing_loss",
    "moe",
    "route",
    "router_z_loss",
    "swiglu",
    "update_selection_bias",
]
