"""Total and active parameters of a config: what a Mixture-of-Experts model holds, and what one
token passes through.

  from jaxlm.models.active_params import param_counts
  param_counts(preset("qwen3_next", "125m"))   # {"total": ..., "active": ..., "routed_experts": ..., ...}

Active parameters are counted as the MoE papers report them (Mixtral's 12.9B of 46.7B, Qwen3-Next's
3B of 80B): every parameter, less the routed experts a token is not sent to, so per MoE layer
top_k / n_experts of its routed experts' weights (gate, up and down) count, and its router and
shared experts count whole. The embedding table counts whole too, although a token reads one row
of it. Nothing is allocated: the model is built under ``nnx.eval_shape``, as ``count_params`` does.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.layers.moe import MoE
from jaxlm.models.config import ModelConfig
from jaxlm.models.lm import LM, count_params

ROUTED = ("w_gate", "w_up", "w_down")  # an MoE layer's routed experts' weights, each [E, ·, ·]


def _size(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def param_counts(config: ModelConfig) -> dict[str, int]:
    """{"total", "active", "routed_experts", "active_routed_experts", "embedding"} for ``config``:
    total is ``count_params``; routed_experts every MoE layer's routed expert weights, of which
    active_routed_experts = routed_experts · top_k / n_experts; active = total − routed_experts +
    active_routed_experts (see the module docstring); embedding the input table (and an untied
    output head)."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a jaxlm.models.ModelConfig, got {type(config).__name__}")
    model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    routed = active_routed = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MoE):
            layer = sum(_size(getattr(node, name)) for name in ROUTED if getattr(node, name) is not None)
            if layer % node.num_experts:
                raise ValueError(f"an MoE layer's routed weights ({layer}) do not split into {node.num_experts} experts")
            routed += layer
            active_routed += layer // node.num_experts * node.top_k
    total = count_params(model)
    return dict(total=total, active=total - routed + active_routed, routed_experts=routed,
                active_routed_experts=active_routed, embedding=_size(nnx.state(model.embed, nnx.Param)))


def count_active_params(config: ModelConfig) -> int:
    """Parameters one token passes through (see ``param_counts``); equal to ``count_params`` for a
    model without MoE layers."""
    return param_counts(config)["active"]
