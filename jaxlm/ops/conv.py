"""The short causal depthwise convolution that precedes the mixers of Mamba, GDN and friends.

  y_t = act(bias + Σ_{i=0}^{W-1} weight[:, i] · x_{t-(W-1)+i})

weight[:, W-1] multiplies the current token, as in PyTorch ``nn.Conv1d(groups=D)`` with W-1
left padding and in the causal-conv1d and fla libraries, so their weights load unchanged.
The conv state is the last W-1 inputs, channel-last and oldest first: exactly the left padding
the next call needs, which makes one-token decode the same code as a full sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.ops import nonfinite, validation
from jaxlm.ops.sequence import segment_starts
from jaxlm.typing import ConvBias, ConvState, ConvWeight, Hidden, SegmentIds, no_type_check

_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, None: lambda x: x}


def _check_args(x, weight, bias, activation, initial_state, output_final_state, segment_ids) -> None:
    validation.check_rank("x", x, 3, "BTD")
    validation.check_float("x", x)
    b, t, d = np.shape(x)
    if 0 in (b, t, d):
        raise ValueError(f"x must have non-empty B, T and D, got shape {np.shape(x)}")
    validation.check_rank("weight", weight, 2, "DW")
    validation.check_float("weight", weight)
    wd, width = np.shape(weight)
    if wd != d or width < 1:
        raise ValueError(f"weight must have shape [D={d}, W] with W >= 1, got shape {np.shape(weight)}")
    if bias is not None:
        validation.check_float("bias", bias)
        validation.check_shape("bias", bias, (d,), "D")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
    if initial_state is not None:
        validation.check_float("initial_state", initial_state)
        validation.check_shape("initial_state", initial_state, (b, width - 1, d), "B,W-1,D")
    if not isinstance(output_final_state, (bool, np.bool_)):
        raise ValueError(f"output_final_state must be a bool, got {output_final_state!r}")
    validation.check_segment_ids(segment_ids, b, t)


@no_type_check
def causal_conv1d(
    x: Hidden,
    weight: ConvWeight,
    bias: ConvBias | None = None,
    *,
    activation: str | None = "silu",
    initial_state: ConvState | None = None,
    output_final_state: bool = False,
    segment_ids: SegmentIds | None = None,
) -> tuple[Hidden, ConvState | None]:
    """Causal depthwise 1-D convolution over time, with an optional activation.

    Args:
      x: [B, T, D]. weight: [D, W], W the kernel width; weight[:, W-1] multiplies the current token.
      bias: [D] or None. activation: "silu" (alias "swish") or None.
      initial_state: [B, W-1, D], the inputs before t=0, oldest first; zeros when None. It
        applies to the first segment of each row only.
      output_final_state: also return the conv state after the last token.
      segment_ids: [B, T] ints of packed documents; inputs of another document count as zeros.
    Returns:
      y [B, T, D] in x's dtype, and the final state [B, W-1, D] in float32 (or None): the last
      W-1 inputs, with those outside the last token's document zeroed so that decoding
      continues that document alone. Accumulation is float32. A non-finite input makes exactly
      the outputs whose window holds it NaN, and stays in the state while it is in the window.
    """
    _check_args(x, weight, bias, activation, initial_state, output_final_state, segment_ids)
    b, t, d = x.shape
    width = weight.shape[1]
    f32 = jnp.float32
    if initial_state is None:
        initial_state = jnp.zeros((b, width - 1, d), f32)
    # xp[:, t + i] is x_{t-(W-1)+i}: the state supplies the W-1 inputs before t=0.
    xp = jnp.concatenate([initial_state.astype(f32), x.astype(f32)], axis=1)  # [B, T+W-1, D]
    # A running document number: it advances at every id change, so equal ids in two separate
    # runs stay separate. The state's slots belong to document 0, the first segment.
    doc = jnp.cumsum(segment_starts(segment_ids, b, t), axis=1)
    doc_p = jnp.concatenate([jnp.zeros((b, width - 1), doc.dtype), doc], axis=1)  # [B, T+W-1]

    w = weight.astype(f32)
    y = jnp.zeros((b, t, d), f32) if bias is None else jnp.broadcast_to(bias.astype(f32), (b, t, d))
    # Non-finite inputs are summed as zeros and put back where they reach (ops.nonfinite): with
    # masks alone, the weight's gradient would still take 0·NaN from every masked tap.
    finite_p = jnp.isfinite(xp)
    xp_finite = jnp.where(finite_p, xp, 0.0)
    clean = None  # [B, T, D]: every tap of t's window in its document is finite
    for i in range(width):
        tap, finite = xp_finite[:, i : i + t], finite_p[:, i : i + t]
        if segment_ids is not None:
            same = (doc_p[:, i : i + t] == doc)[..., None]
            tap, finite = jnp.where(same, tap, 0.0), finite | ~same
        y = y + w[:, i] * tap
        clean = finite if clean is None else clean & finite
    y = jnp.where(clean, _ACTIVATIONS[activation](y), jnp.nan).astype(x.dtype)

    if not output_final_state:
        return y, None
    state = xp[:, t:]  # [B, W-1, D]: the last W-1 inputs, from initial_state when T < W-1
    if segment_ids is not None:
        state = jnp.where((doc_p[:, t:] == doc[:, -1:])[..., None], state, 0.0)
    return y, state
