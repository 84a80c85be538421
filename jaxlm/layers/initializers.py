"""Parameter initialisation shared by the layers.

- Projections and embeddings: normal with std 0.02 (GPT-2, Llama and fla's
  ``initializer_range``), no bias. Output projections use the same std; a model that wants them
  scaled by depth can rescale after construction.
- Short convolutions: PyTorch's ``nn.Conv1d`` default, uniform in ±1/sqrt(W) (fan-in of a
  depthwise filter is its width), so the scale matches the reference implementations.
- SSM decays (Mamba-2, Gated DeltaNet): ``A_log`` and ``dt_bias`` as in the Mamba-2 paper and
  code (mamba_ssm): A uniform in a range, stored as log; dt log-uniform in [dt_min, dt_max],
  floored, stored as its inverse softplus so that softplus(dt_bias) = dt at initialisation.

Every parameter is created with the logical names of its axes (``jaxlm.axis_names``) as nnx
metadata, through ``dense`` or ``param``; ``jaxlm.sharding`` derives its placement from them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.axis_names import LOGICAL_AXES, METADATA_KEY

INIT_STD = 0.02

Axes = tuple[str | None, ...]


def check_axes(axes: Axes, ndim: int) -> Axes:
    """axes: one logical name of LOGICAL_AXES (or None) per array axis."""
    axes = tuple(axes)
    if len(axes) != ndim or any(a is not None and a not in LOGICAL_AXES for a in axes):
        raise ValueError(f"axes must name each of {ndim} axes with one of {list(LOGICAL_AXES)} or None, got {axes!r}")
    return axes


def param(value: jax.Array, axes: Axes, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """``kind(value)`` (an nnx.Param by default) whose axes have the logical names ``axes``."""
    return kind(value, **{METADATA_KEY: check_axes(axes, value.ndim)})


def dense(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None],
    rngs: nnx.Rngs,
    dtype,
    param_dtype,
    use_bias: bool = False,
    precision: jax.lax.Precision | None = None,
) -> nnx.Linear:
    """A Linear [in, out] with the normal(0.02) kernel and zero bias; ``axes`` are the logical
    names of the kernel's (in, out) axes, and the bias [out] shares the out name."""
    axes = check_axes(axes, 2)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=nnx.initializers.normal(INIT_STD),
        kernel_metadata={METADATA_KEY: axes},
        bias_metadata={METADATA_KEY: axes[1:]},
        rngs=rngs,
    )


def conv_weight(key: jax.Array, channels: int, width: int, param_dtype) -> jax.Array:
    """[C, W] depthwise filter, uniform in ±1/sqrt(W) as PyTorch initialises Conv1d."""
    bound = width**-0.5
    return jax.random.uniform(key, (channels, width), param_dtype, -bound, bound)


def a_log_init(key: jax.Array, n_heads: int, a_range: tuple[float, float], param_dtype) -> jax.Array:
    """[HV] log of A ~ uniform(a_range); the layer uses A = -exp(A_log) as its decay rate."""
    a = jax.random.uniform(key, (n_heads,), jnp.float32, a_range[0], a_range[1])
    return jnp.log(a).astype(param_dtype)


def dt_bias_init(
    key: jax.Array, n_heads: int, dt_min: float, dt_max: float, dt_floor: float, param_dtype
) -> jax.Array:
    """[HV] inverse softplus of dt, dt log-uniform in [dt_min, dt_max] and at least dt_floor."""
    u = jax.random.uniform(key, (n_heads,), jnp.float32)
    dt = jnp.exp(u * (jnp.log(dt_max) - jnp.log(dt_min)) + jnp.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    # softplus⁻¹(dt) = dt + log(1 − exp(−dt)), written with expm1 for accuracy at small dt.
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype)
