"""Feed-forward layers: the SwiGLU of Llama, Qwen and most current LMs, down(silu(gate(x)) · up(x)),
and the squared-ReLU MLP of Nemotron-H, down(relu(up(x))²)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.initializers import dense
from jaxlm.layers.validation import check_positive

ACTIVATIONS = ("swiglu", "relu2")


class SwiGLU(nnx.Module):
    """x [B, T, D] -> [B, T, D] through a hidden width F, no biases, normal(0.02) init."""

    def __init__(self, d_model: int, d_ff: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive(d_model=d_model, d_ff=d_ff)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = dense(d_model, d_ff, **kw)
        self.up_proj = dense(d_model, d_ff, **kw)
        self.down_proj = dense(d_ff, d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Relu2MLP(nnx.Module):
    """x [B, T, D] -> down(relu(up(x))²) [B, T, D]: ungated, hidden width F, no biases (Nemotron-H)."""

    def __init__(self, d_model: int, d_ff: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive(d_model=d_model, d_ff=d_ff)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.up_proj = dense(d_model, d_ff, **kw)
        self.down_proj = dense(d_ff, d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jnp.square(jax.nn.relu(self.up_proj(x))))


def feed_forward(activation: str, d_model: int, d_ff: int, **kwargs) -> SwiGLU | Relu2MLP:
    """The dense feed-forward for ``activation`` in ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    return (SwiGLU if activation == "swiglu" else Relu2MLP)(d_model, d_ff, **kwargs)
