"""Feed-forward layers: the SwiGLU of Llama, Qwen and most current LMs, down(silu(gate(x)) · up(x)),
and the squared-ReLU MLP of Nemotron-H, down(relu(up(x))²)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.axis_names import EMBED, MLP
from jaxlm.layers.initializers import dense
from jaxlm.layers.validation import check_positive
from jaxlm.typing import Features

class SwiGLU(nnx.Module):
    """x [B, T, D] -> [B, T, D] through a hidden width F, no biases, normal(0.02) init."""

    def __init__(self, d_model: int, d_ff: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive(d_model=d_model, d_ff=d_ff)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = dense(d_model, d_ff, axes=(EMBED, MLP), **kw)
        self.up_proj = dense(d_model, d_ff, axes=(EMBED, MLP), **kw)
        self.down_proj = dense(d_ff, d_model, axes=(MLP, EMBED), **kw)

    def __call__(self, x: Features) -> Features:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Relu2MLP(nnx.Module):
    """x [B, T, D] -> down(relu(up(x))²) [B, T, D]: ungated, hidden width F, no biases (Nemotron-H)."""

    def __init__(self, d_model: int, d_ff: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive(d_model=d_model, d_ff=d_ff)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.up_proj = dense(d_model, d_ff, axes=(EMBED, MLP), **kw)
        self.down_proj = dense(d_ff, d_model, axes=(MLP, EMBED), **kw)

    def __call__(self, x: Features) -> Features:
        return self.down_proj(jnp.square(jax.nn.relu(self.up_proj(x))))


# The feed-forward of each activation name; the MoE experts implement the same names (ops.moe).
FEED_FORWARDS = {"swiglu": SwiGLU, "relu2": Relu2MLP}
ACTIVATIONS = tuple(FEED_FORWARDS)


def feed_forward(activation: str, d_model: int, d_ff: int, **kwargs) -> SwiGLU | Relu2MLP:
    """The dense feed-forward for ``activation`` in ACTIVATIONS."""
    if activation not in FEED_FORWARDS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    return FEED_FORWARDS[activation](d_model, d_ff, **kwargs)
