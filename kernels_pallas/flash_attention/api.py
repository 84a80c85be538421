"""flash_attention: layout, padding and the custom VJP joining the forward and backward kernels."""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp

from kernels_pallas.flash_attention import config, tiles
from kernels_pallas.flash_attention.backward import backward
from kernels_pallas.flash_attention.forward import forward
from kernels_pallas.flash_attention.layout import Layout
from kernels_pallas.settings import Interpret, Target, resolve_target


@dataclasses.dataclass(frozen=True)
class _Static:
    spec: tiles.MaskSpec
    scale: float
    blocks: config.BlockSizes
    layout: Layout
    target: Target

    def kernel_args(self) -> dict:
        return dict(spec=self.spec, scale=self.scale, blocks=self.blocks, layout=self.layout, target=self.target)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, q_seg, kv_seg, static: _Static):
    o, _ = forward(q, k, v, q_seg, kv_seg, **static.kernel_args())
    return o


def _attend_fwd(q, k, v, q_seg, kv_seg, static: _Static):
    o, lse = forward(q, k, v, q_seg, kv_seg, **static.kernel_args())
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _attend_bwd(static: _Static, residuals, do):
    q, k, v, q_seg, kv_seg, o, lse = residuals
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    delta = (jnp.swapaxes(delta, 1, 2) if static.layout.token_major else delta)[..., None]  # [B, H, T, 1]
    dq, dk, dv = backward(q, k, v, q_seg, kv_seg, do.astype(q.dtype), lse, delta, **static.kernel_args())
    return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _fit_blocks(blocks: config.BlockSizes, t: int, s: int, floor: int) -> config.BlockSizes:
    return config.BlockSizes(
        block_q=config.fit_block(blocks.block_q, t, floor),
        block_k=config.fit_block(blocks.block_k, s, floor),
        block_q_bwd=config.fit_block(blocks.block_q_bwd, t, floor),
        block_k_bwd=config.fit_block(blocks.block_k_bwd, s, floor),
    )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    block_sizes: config.BlockSizes | None = None,
    interpret: Interpret | None = None,
    backend: str | None = None,
) -> jax.Array:
    """Softmax attention by the flash-attention kernels, differentiable in q, k and v.

    Args:
      q: [B, T, H, D]; k: [B, S, Hk, D]; v: [B, S, Hk, Dv]; H a multiple of Hk (query head j
        reads kv head j // (H/Hk)); D, Dv <= 256.
      segment_ids: [B, T] ints (S == T); a query sees only keys with an equal id.
      causal: key s visible to query t only if s <= t (needs S == T).
      scale: multiplies the scores; default D**-0.5.
      window: causal: t - window < s <= t; non-causal: |t - s| < window.
      block_sizes: tiles; default per target (config.default_block_sizes), shrunk for short inputs.
      interpret, backend: where the kernels run (kernels_pallas.settings: False compiled, True the
        HLO interpreter, a pltpu.InterpretParams TPU interpret mode); defaults from the current
        ``KernelSettings``, else the HLO interpreter on CPU and compiled elsewhere.
    Returns:
      o [B, T, H, Dv] in v's dtype. Matmuls take the inputs' (common) dtype and accumulate in
      float32. A query that sees no key gets zeros.
    """
    b, t, h, d = q.shape
    s, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    if k.shape != (b, s, hk, d) or v.shape[:3] != (b, s, hk) or h % hk:
        raise ValueError(f"q [B, T, H, D], k [B, S, Hk, D], v [B, S, Hk, Dv] with H % Hk == 0; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if max(d, dv) > config.MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {config.MAX_HEAD_DIM}, got D={d}, Dv={dv}")
    if (causal or segment_ids is not None) and s != t:
        raise ValueError(f"causal or segmented attention needs S == T, got T={t}, S={s}")
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool) or window <= 0):
        raise ValueError(f"window must be None or a positive int, got {window!r}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must have shape [B={b}, T={t}], got {segment_ids.shape}")
    target = resolve_target(backend, interpret)
    dp, dvp = config.padded_head_dim(d), config.padded_head_dim(dv)
    blocks = block_sizes or config.default_block_sizes(max(dp, dvp), target)
    blocks = _fit_blocks(blocks, t, s, config.min_block(target))
    config.check_tpu_blocks(blocks, target)
    scale = d**-0.5 if scale is None else float(scale)
    window = None if window is None else int(window)
    layout = Layout(token_major=config.token_major(target))
    return _flash(q, k, v, segment_ids, causal=bool(causal), scale=scale, window=window, blocks=blocks,
                  layout=layout, target=target)


@functools.partial(jax.jit, static_argnames=("causal", "scale", "window", "blocks", "layout", "target"))
def _flash(q, k, v, segment_ids, *, causal, scale, window, blocks, layout, target):
    b, t, h, d = q.shape
    s, dv = k.shape[1], v.shape[3]
    tq = -(-t // max(blocks.block_q, blocks.block_q_bwd)) * max(blocks.block_q, blocks.block_q_bwd)
    sk = -(-s // max(blocks.block_k, blocks.block_k_bwd)) * max(blocks.block_k, blocks.block_k_bwd)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)

    def to_layout(x, length, dim):  # [B, L, heads, dim] -> padded, in the kernels' layout
        x = _pad_axis(_pad_axis(x.astype(dtype), 1, length), 3, config.padded_head_dim(dim))
        return x if layout.token_major else jnp.swapaxes(x, 1, 2)

    qh, kh, vh = to_layout(q, tq, d), to_layout(k, sk, d), to_layout(v, sk, dv)
    q_seg = kv_seg = None
    if segment_ids is not None:
        ids = segment_ids.astype(jnp.int32)
        # Padding keys are masked by position; padding queries may see anything (they are cut off).
        q_seg = _pad_axis(ids, 1, tq)[:, :, None]
        kv_seg = _pad_axis(ids, 1, sk)[:, None, :]
    spec = tiles.MaskSpec(causal=causal, window=window, q_len=t, kv_len=s, kv_padded=sk > s,
                          has_segments=segment_ids is not None)
    o = _attend(qh, kh, vh, q_seg, kv_seg, _Static(spec, scale, blocks, layout, target))
    o = o if layout.token_major else jnp.swapaxes(o, 1, 2)
    return o[:, :t, :, :dv].astype(v.dtype)
