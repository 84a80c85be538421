"""The Mixture-of-Experts feed-forward layer: parameters only; the math is jaxlm.ops.moe.

Dimension letters: B batch, T time, D d_model, E num_experts, F d_ff, S shared width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.axis_names import EMBED, EXPERT, MLP
from jaxlm.layers.initializers import INIT_STD, dense, param
from jaxlm.layers.mlp import feed_forward
from jaxlm.layers.validation import check_positive, check_positive_float
from jaxlm.ops import moe as moe_ops
from jaxlm.ops.moe import MoEAux
from jaxlm.typing import Arr, Hidden


class RouterBias(nnx.Variable):
    """DeepSeek-V3's per-expert selection bias: not a Param, so no optimizer touches it; the
    trainer moves it with ``MoE.update_selection_bias`` after each step."""


def _linear_f32(d_in: int, d_out: int, *, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free Linear [D, d_out] computing in float32 at HIGHEST precision: routing decisions
    and gates are sensitive to rounding, so they never drop to bf16 or TF32 passes. Its outputs
    (one logit per expert, or the shared gate) are needed whole by every token: not sharded."""
    return dense(
        d_in, d_out, axes=(EMBED, None), dtype=jnp.float32, param_dtype=param_dtype,
        precision=jax.lax.Precision.HIGHEST, rngs=rngs,
    )


class MoE(nnx.Module):
    """Routed experts (SwiGLU, or squared ReLU) plus optional shared experts: ``y, aux = moe(x)``, x [B, T, D].

    Parameters, all initialised normal(0.02) like every jaxlm layer (jaxlm.layers.initializers):
      router.kernel [D, E] (no bias; logits in float32);
      w_gate, w_up [E, D, F] and w_down [E, F, D]: the routed experts (no w_gate for "relu2");
      shared: a SwiGLU (or Relu2MLP) of width S = num_shared_experts · shared_d_ff when
        num_shared_experts > 0; S experts of width shared_d_ff always applied and summed are the
        same function as one SwiGLU of their total width (Qwen-MoE, DeepSeek);
      shared_gate.kernel [D, 1] with shared_expert_gate: the shared output is scaled by
        sigmoid(x · kernel) per token (Qwen3-Next);
      selection_bias [E], a RouterBias (not a Param), with use_selection_bias.

    Args:
      d_model, d_ff: model width D and routed-expert hidden width F.
      num_experts, top_k: E experts, k chosen per token.
      capacity_factor: None (dropless, the default) or a positive float: each expert then takes
        ceil(capacity_factor · B·T·k / E) assignments and drops the rest.
      num_shared_experts, shared_d_ff: shared experts and their width (default d_ff).
      router: "softmax_topk" (default), "topk_softmax" (Mixtral) or "sigmoid" (DeepSeek-V3).
      renormalize: make the k gates of each token sum to 1.
      shared_expert_gate: gate the shared experts with a per-token sigmoid.
      use_selection_bias: auxiliary-loss-free balancing (DeepSeek-V3).
      activation: "swiglu" (default) or "relu2", ungated relu(x·W_up)²·W_down experts and shared
        experts (Nemotron-H). Either runs through ``jaxlm.ops.moe.moe`` on every path: dropless,
        capacity and expert-parallel.
      routed_scale: multiplies the routed experts' output (Nemotron-H's and DeepSeek-V3's
        routed_scaling_factor); the shared experts are not scaled.
      impl: dropless grouped-matmul form, None (platform default), "ragged_dot" or "tiled".
      dtype: compute dtype of the experts. param_dtype: storage dtype of the parameters.

    ``aux`` is a MoEAux: load_balancing_loss, router_z_loss, expert_counts [E] and
    dropped_fraction. Under ``jax.set_mesh`` with an ``expert`` axis of size > 1 the experts run
    sharded over it with all-to-all, with the single-device result.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        *,
        capacity_factor: float | None = None,
        num_shared_experts: int = 0,
        shared_d_ff: int | None = None,
        router: str = "softmax_topk",
        renormalize: bool = False,
        shared_expert_gate: bool = False,
        use_selection_bias: bool = False,
        activation: str = "swiglu",
        routed_scale: float = 1.0,
        impl: str | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        shared_d_ff = d_ff if shared_d_ff is None else shared_d_ff
        check_positive(d_model=d_model, d_ff=d_ff, num_experts=num_experts, shared_d_ff=shared_d_ff)
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        if shared_expert_gate and num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")
        moe_ops.check_top_k(top_k, num_experts)
        moe_ops.check_router(router)
        moe_ops.check_capacity_factor(capacity_factor)
        moe_ops.check_grouped_impl(impl)
        moe_ops.check_activation(activation)
        check_positive_float(routed_scale=routed_scale)

        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.capacity_factor, self.router_name, self.renormalize = capacity_factor, router, renormalize
        self.impl, self.dtype = impl, dtype
        self.activation, self.routed_scale = activation, float(routed_scale)
        self.router = _linear_f32(d_model, num_experts, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(INIT_STD)
        gated = activation == "swiglu"
        up_axes, down_axes = (EXPERT, EMBED, MLP), (EXPERT, MLP, EMBED)
        self.w_gate = param(init(rngs.params(), (num_experts, d_model, d_ff), param_dtype), up_axes) if gated else None
        self.w_up = param(init(rngs.params(), (num_experts, d_model, d_ff), param_dtype), up_axes)
        self.w_down = param(init(rngs.params(), (num_experts, d_ff, d_model), param_dtype), down_axes)
        # Each optional part is assigned once, as a module or None (NNX fixes an attribute's kind
        # on its first assignment).
        width = num_shared_experts * shared_d_ff
        self.shared = (
            feed_forward(activation, d_model, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if num_shared_experts else None
        )
        self.shared_gate = _linear_f32(d_model, 1, param_dtype=param_dtype, rngs=rngs) if shared_expert_gate else None
        self.selection_bias = (
            param(jnp.zeros((num_experts,), jnp.float32), (None,), RouterBias) if use_selection_bias else None
        )

    def __call__(self, x: Arr) -> tuple[Hidden, MoEAux]:
        """x: [B, T, D] -> (y [B, T, D] in dtype, MoEAux)."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [B, T, D={self.d_model}], got shape {x.shape}")
        b, t, d = x.shape
        tokens = x.reshape(b * t, d).astype(self.dtype)
        cast = lambda w: w[...].astype(self.dtype)
        routing = dict(
            top_k=self.top_k,
            router=self.router_name,
            renormalize=self.renormalize,
            selection_bias=None if self.selection_bias is None else self.selection_bias[...],
        )
        w_gate = None if self.w_gate is None else cast(self.w_gate)
        y, aux = moe_ops.moe(
            tokens, self.router(tokens), w_gate, cast(self.w_up), cast(self.w_down),
            capacity_factor=self.capacity_factor, activation=self.activation, impl=self.impl, **routing,
        )
        if self.routed_scale != 1.0:
            y = (y.astype(jnp.float32) * self.routed_scale).astype(self.dtype)
        if self.shared is not None:
            shared = self.shared(tokens).astype(jnp.float32)
            if self.shared_gate is not None:
                shared = jax.nn.sigmoid(self.shared_gate(tokens)) * shared
            y = (y.astype(jnp.float32) + shared).astype(self.dtype)
        return y.reshape(b, t, d), aux

    def update_selection_bias(self, expert_counts: jax.Array, rate: float | jax.Array) -> None:
        """One auxiliary-loss-free balancing step from aux.expert_counts [E] with step γ = rate."""
        if self.selection_bias is None:
            raise ValueError("update_selection_bias needs MoE(..., use_selection_bias=True)")
        self.selection_bias[...] = moe_ops.update_selection_bias(self.selection_bias[...], expert_counts, rate)

