"""Where a kernel's tiles sit in HBM: token-major [B, L, heads, W] or head-major [B, heads, L, W].

Token-major is the caller's own layout, so GPU kernels read q, k, v and write o, dq, dk, dv
with no transpose around them (Triton loads a strided tile as easily as a contiguous one).
TPU (and the interpreter by default) uses head-major, so that a tile's last two dimensions are
(rows, W) as Mosaic's (8, 128) tiling wants. Every kernel sees the same 2-D [rows, W] refs in
both layouts; only the block specs, and the index of a head inside a group block, differ.
The grid is always (batch, head, tile).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jax.experimental import pallas as pl


def _same(h):
    return h


@dataclasses.dataclass(frozen=True)
class Layout:
    token_major: bool

    def dims(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(B, heads, L, W) of an array in this layout."""
        b, first, second, w = shape
        return (b, second, first, w) if self.token_major else (b, first, second, w)

    def array_shape(self, b: int, heads: int, length: int, width: int) -> tuple[int, int, int, int]:
        return (b, length, heads, width) if self.token_major else (b, heads, length, width)

    def tile(self, rows: int, width: int, head: Callable = _same) -> pl.BlockSpec:
        """Grid point (b, h, i) reads rows [i·rows, (i+1)·rows) of head head(h): a [rows, W] ref."""
        if self.token_major:
            return pl.BlockSpec((None, rows, None, width), lambda b, h, i: (b, i, head(h), 0))
        return pl.BlockSpec((None, None, rows, width), lambda b, h, i: (b, head(h), i, 0))

    def whole(self, length: int, width: int, head: Callable = _same) -> pl.BlockSpec:
        """Grid point (b, h, i) reads all rows of head head(h): a [L, W] ref."""
        if self.token_major:
            return pl.BlockSpec((None, length, None, width), lambda b, h, i: (b, 0, head(h), 0))
        return pl.BlockSpec((None, None, length, width), lambda b, h, i: (b, head(h), 0, 0))

    def group(self, groups: int, length: int, width: int) -> pl.BlockSpec:
        """Grid point (b, h, i) reads all rows of heads [h·groups, (h+1)·groups)."""
        if self.token_major:
            return pl.BlockSpec((None, length, groups, width), lambda b, h, i: (b, 0, h, 0))
        return pl.BlockSpec((None, groups, length, width), lambda b, h, i: (b, h, 0, 0))

    def read_group(self, ref, g, rows):
        """[rows, W] of head g from a ``group`` block."""
        return ref[rows, g, :] if self.token_major else ref[g, rows, :]


HEAD_MAJOR = Layout(token_major=False)  # lse and delta, [B, H, T, 1], in every layout
