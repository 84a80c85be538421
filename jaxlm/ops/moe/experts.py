"""The expert feed-forward, in two activations and three layouts.

Dimension letters: M rows, D model width, F hidden width, G groups (experts), C capacity.

Activations (ACTIVATIONS):

- ``"swiglu"``: y = (silu(x·W_gate) ⊙ (x·W_up))·W_down (Llama, Qwen, Mixtral, DeepSeek);
- ``"relu2"``: y = relu(x·W_up)²·W_down, ungated, no W_gate (Nemotron-H).

Layouts:

- ``expert``: one expert on any leading shape (shared experts, dense references);
- ``batched_experts``: E experts on E equal-size buffers (the capacity path);
- ``grouped_experts``: G experts on rows sorted by expert, in groups of any size (dropless).

``swiglu`` and ``grouped_swiglu`` are the SwiGLU forms of ``expert`` and ``grouped_experts``.

Products accumulate in float32 at HIGHEST precision, so TPU and GPU do not drop to bf16 or
TF32 passes; the hidden activation is cast back to x's dtype before the down projection, as a
dense layer computing in that dtype would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.ops.dispatch import FormTable, Impl
from jaxlm.typing import Arr, DownWeights, ExpertRows, GroupSizes, Rows, UpWeights

ACTIVATIONS = ("swiglu", "relu2")
_HIGHEST = jax.lax.Precision.HIGHEST
_MAX_TILE = 512  # largest tile of the "tiled" form: full matmul speed on CPU, bounded padding per group


def check_activation(activation: Any) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")


def check_grouped_impl(impl: Any) -> None:
    """A ValueError unless impl names forms of GROUPED_EXPERT_FORMS (or is None)."""
    GROUPED_EXPERT_FORMS.candidates(impl)


def _einsum(spec: str, a: Arr, b: Arr) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _hidden(
    dot: Callable[[Arr, Arr], jax.Array],
    x: Arr,
    w_gate: Arr | None,
    w_up: Arr,
    activation: str,
) -> jax.Array:
    """The hidden activation [..., F] float32, from ``dot(x, w)``, the layout's up product."""
    up = dot(x, w_up)
    if activation == "relu2":
        return jnp.square(jax.nn.relu(up))
    return jax.nn.silu(dot(x, w_gate)) * up


def expert(x: Arr, w_gate: Arr | None, w_up: Arr, w_down: Arr, *, activation: str = "swiglu") -> jax.Array:
    """One expert. x: [..., D]; w_gate (None for "relu2"), w_up: [D, F]; w_down: [F, D].
    Returns [..., D] float32."""
    h = _hidden(lambda a, w: _einsum("...d,df->...f", a, w), x, w_gate, w_up, activation)
    return _einsum("...f,fd->...d", h.astype(x.dtype), w_down)


def batched_experts(
    x: ExpertRows, w_gate: UpWeights | None, w_up: UpWeights, w_down: DownWeights, *, activation: str = "swiglu"
) -> ExpertRows:
    """Expert g on x[g]. x: [G, M, D]; w_gate (None for "relu2"), w_up: [G, D, F]; w_down: [G, F, D].
    Returns [G, M, D] float32."""
    h = _hidden(lambda a, w: _einsum("gmd,gdf->gmf", a, w), x, w_gate, w_up, activation)
    return _einsum("gmf,gfd->gmd", h.astype(x.dtype), w_down)


def _ragged_dot_experts(
    x: Rows, w_gate: UpWeights | None, w_up: UpWeights, w_down: DownWeights, group_sizes: GroupSizes, *,
    activation: str,
) -> Rows:
    def dot(a, w):
        return jax.lax.ragged_dot(a, w, group_sizes, precision=_HIGHEST, preferred_element_type=jnp.float32)

    h = _hidden(dot, x, w_gate, w_up, activation)
    return dot(h.astype(x.dtype), w_down)


def _tile_rows(rows: int, groups: int) -> int:
    """The power of two at or above the mean group size, at most _MAX_TILE. Padding every group
    to whole tiles adds fewer than G·tile < 2·(rows + G) rows, so few rows never pay for G big
    tiles, while tiles as big as the groups keep the weight gather and per-tile cost small
    (measured on CPU: halving the tile at E=64, k=2 costs 20-30% of the throughput)."""
    mean = -(-rows // groups)
    return min(_MAX_TILE, 1 << (mean - 1).bit_length())


def _tiled_experts(
    x: Rows, w_gate: UpWeights | None, w_up: UpWeights, w_down: DownWeights, group_sizes: GroupSizes, *,
    activation: str,
) -> Rows:
    """Pads each group to whole tiles, so that every tile belongs to one expert, and runs the
    tiles as one batched matmul against their experts' gathered weights."""
    rows, width = x.shape
    groups = w_up.shape[0]
    tile = _tile_rows(rows, groups)
    # Σ_g ceil(size_g / tile) < rows / tile + G, so this many tiles always suffice.
    num_tiles = -(-rows // tile) + groups
    ends = jnp.cumsum(group_sizes)
    padded = -(-group_sizes // tile) * tile
    padded_ends = jnp.cumsum(padded)
    row = jnp.arange(rows)
    group = jnp.searchsorted(ends, row, side="right")  # == groups for padding rows
    safe = jnp.minimum(group, groups - 1)
    offset = row - (ends - group_sizes)[safe]
    # Padding rows get an index past the end, which scatter drops and gather fills with zero.
    dest = jnp.where(group < groups, (padded_ends - padded)[safe] + offset, num_tiles * tile)
    tiles = jnp.zeros((num_tiles * tile, width), x.dtype).at[dest].set(x, mode="drop")
    # Tiles past the last group compute on zeros with the last expert; their rows are never read.
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right"), groups - 1)
    out = batched_experts(
        tiles.reshape(num_tiles, tile, width),
        None if w_gate is None else w_gate[tile_group],
        w_up[tile_group],
        w_down[tile_group],
        activation=activation,
    )
    return out.reshape(num_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0)


# Every form: (x [M, D], w_gate [G, D, F] or None, w_up [G, D, F], w_down [G, F, D], group_sizes
# [G], *, activation) -> [M, D] float32. XLA:CPU lowers ragged_dot to a masked product over every
# group (G times the work of the rows themselves), so the CPU runs the tiled form; on GPU and TPU
# jax emits XLA's ragged-dot instruction, which compiles to a grouped matmul.
GROUPED_EXPERT_FORMS = FormTable(
    "grouped_experts",
    {"ragged_dot": _ragged_dot_experts, "tiled": _tiled_experts},
    {"cpu": ("tiled",), "gpu": ("ragged_dot",), "tpu": ("ragged_dot",)},
)
GROUPED_IMPLS = GROUPED_EXPERT_FORMS.names


def grouped_experts(
    x: Rows,
    w_gate: UpWeights | None,
    w_up: UpWeights,
    w_down: DownWeights,
    group_sizes: GroupSizes,
    *,
    activation: str = "swiglu",
    impl: Impl = None,
) -> Rows:
    """Expert g applied to its own run of rows.

    Args:
      x: [M, D] rows sorted by group: the first group_sizes[0] rows belong to expert 0, and so
        on. Rows past sum(group_sizes) are padding.
      w_gate (None for "relu2"), w_up: [G, D, F]. w_down: [G, F, D].
      group_sizes: [G] int32, summing to at most M.
      activation: one of ACTIVATIONS.
      impl: "ragged_dot" (jax.lax.ragged_dot), "tiled" (fixed-size tiles, one expert each, as
        a batched matmul), a sequence of them, or None for the platform's default.
    Returns:
      [M, D] float32; padding rows are zero.
    """
    check_activation(activation)
    return GROUPED_EXPERT_FORMS.run(impl, x, w_gate, w_up, w_down, group_sizes, activation=activation)


def swiglu(x: Arr, w_gate: Arr, w_up: Arr, w_down: Arr) -> jax.Array:
    """x: [..., D]; w_gate, w_up: [D, F]; w_down: [F, D]. Returns [..., D] float32."""
    return expert(x, w_gate, w_up, w_down, activation="swiglu")


def grouped_swiglu(
    x: Rows,
    w_gate: UpWeights,
    w_up: UpWeights,
    w_down: DownWeights,
    group_sizes: GroupSizes,
    *,
    impl: Impl = None,
) -> Rows:
    """grouped_experts with SwiGLU experts: x [M, D], w_gate, w_up [G, D, F], w_down [G, F, D],
    group_sizes [G] -> [M, D] float32."""
    return grouped_experts(x, w_gate, w_up, w_down, group_sizes, activation="swiglu", impl=impl)
