"""RMSNorm, its zero-centred variant (Qwen3-Next) and gated RMSNorm (Mamba-2, Gated DeltaNet, KDA).

The statistics are computed in float32 whatever the compute dtype, and the result is cast back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.initializers import param
from jaxlm.layers.validation import check_choice, check_divides, check_positive, check_positive_float
from jaxlm.typing import Features

GATE_ACTIVATIONS = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float, zero_centered: bool = False) -> jax.Array:
    """x / sqrt(mean(x², last axis) + eps) · w, with w = weight, or 1 + weight when zero_centred.

    x: [..., D]; weight: [D]. Returns x's shape, in float32.
    """
    x = x.astype(jnp.float32)
    w = weight.astype(jnp.float32)
    w = 1.0 + w if zero_centered else w
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def gated_rms_norm(
    x: jax.Array,
    z: jax.Array,
    weight: jax.Array,
    *,
    eps: float,
    norm_before_gate: bool = True,
    group_size: int | None = None,
    activation: str = "silu",
) -> jax.Array:
    """RMSNorm with a gate act(z), act = silu or (KDA) sigmoid, over groups of ``group_size`` channels.

    norm_before_gate=True (Gated DeltaNet, GLA, Qwen3-Next, KDA):  norm(x)·w · act(z).
    norm_before_gate=False (Mamba-2's default):                    norm(x · act(z))·w.
    x, z: [..., D]; weight: [D]; group_size divides D (default D: one group). Returns float32.
    """
    x = x.astype(jnp.float32)
    gate = GATE_ACTIVATIONS[activation](z.astype(jnp.float32))
    if not norm_before_gate:
        x = x * gate
    d = x.shape[-1]
    g = d if group_size is None else group_size
    xg = x.reshape(*x.shape[:-1], d // g, g)
    y = xg * jax.lax.rsqrt(jnp.mean(xg * xg, axis=-1, keepdims=True) + eps)
    y = y.reshape(x.shape) * weight.astype(jnp.float32)
    return y * gate if norm_before_gate else y


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis. zero_centered stores the weight as an offset from 1 (init 0),
    as Qwen3-Next does, so weight decay pulls the scale towards 1 rather than 0."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        zero_centered: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        check_positive(dim=dim)
        check_positive_float(eps=eps)
        self.eps = eps
        self.zero_centered = zero_centered
        self.dtype = dtype
        init = jnp.zeros if zero_centered else jnp.ones
        self.weight = param(init((dim,), param_dtype), (None,))

    def __call__(self, x: Features) -> Features:
        """x: [..., dim] -> [..., dim] in the compute dtype."""
        return rms_norm(x, self.weight[...], eps=self.eps, zero_centered=self.zero_centered).astype(self.dtype)


class GatedRMSNorm(nnx.Module):
    """RMSNorm gated by silu(z) or sigmoid(z); see ``gated_rms_norm`` for the orders and groups."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        norm_before_gate: bool = True,
        group_size: int | None = None,
        activation: str = "silu",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        check_positive(dim=dim)
        check_positive_float(eps=eps)
        check_choice("activation", activation, tuple(GATE_ACTIVATIONS))
        if group_size is not None:
            check_positive(group_size=group_size)
            check_divides("dim", dim, "group_size", group_size)
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size, self.activation = group_size, activation
        self.dtype = dtype
        self.weight = param(jnp.ones((dim,), param_dtype), (None,))

    def __call__(self, x: Features, z: Features) -> Features:
        """x, z: [..., dim] -> [..., dim] in the compute dtype."""
        y = gated_rms_norm(
            x, z, self.weight[...], eps=self.eps, norm_before_gate=self.norm_before_gate, group_size=self.group_size,
            activation=self.activation,
        )
        return y.astype(self.dtype)
