"""The forward kernel: one program per (batch, head, query tile), online softmax over key tiles.

Lengths are padded to whole tiles and head dims to powers of two (layout.py says where the
tiles sit). Each program keeps its query tile, walks the key tiles it can see (bounds from the
program id) and keeps a running max m, normaliser l and unnormalised output in float32. It
writes o and the log-sum-exp lse = m + log l that the backward pass uses to recompute the
probabilities.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.flash_attention import config, tiles
from kernels_pallas.flash_attention.layout import HEAD_MAJOR, Layout
from kernels_pallas.settings import Target


def _forward_kernel(*refs, spec: tiles.MaskSpec, scale: float, block_q: int, block_k: int):
    if spec.has_segments:
        q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
        q_seg = q_seg_ref[...]  # [bq, 1]
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        kv_seg_ref = q_seg = None
    q_block = pl.program_id(2)
    q_start = q_block * block_q
    q = q_ref[...]  # [bq, D]

    def step(kv_block, carry):
        acc, m, l = carry
        k_start = pl.multiple_of(kv_block * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        s = tiles.dot_nt(q, k_ref[keys, :]) * scale  # [bq, bk]
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, keys]
        mask = tiles.visible(spec, q_start, k_start, block_q, block_k, q_seg, kv_seg)
        if mask is not None:
            s = jnp.where(mask, s, tiles.MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:
            # A row that has seen only masked keys has m_new == MASKED and exp(0) == 1 there.
            p = jnp.where(mask, p, 0.0)
        rescale = jnp.exp(m - m_new)
        l = rescale * l + jnp.sum(p, axis=1, keepdims=True)
        acc = rescale * acc + tiles.dot_nn(p, v_ref[keys, :])
        return acc, m_new, l

    lo, hi = tiles.kv_block_range(spec, q_block, block_q, block_k)
    init = (
        jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32),
        jnp.full((block_q, 1), tiles.MASKED, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(lo, hi, step, init)
    seen = l > 0.0  # False for a query that sees no key: its output is 0 and its lse a dummy 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / safe_l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), 0.0)


def forward(q, k, v, q_seg, kv_seg, *, spec: tiles.MaskSpec, scale: float, blocks: config.BlockSizes,
            layout: Layout, target: Target):
    """q [B, H, Tq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv] (head-major; token-major swaps the
    head and length axes), tile-padded; q_seg [B, Tq, 1] and kv_seg [B, 1, Sk] int32 or None.
    Returns o like q with width Dv, in q's dtype, and lse [B, H, Tq, 1] float32.
    """
    b, h, tq, d = layout.dims(q.shape)
    _, hk, sk, dv = layout.dims(v.shape)
    groups = h // hk
    bq, bk = blocks.block_q, blocks.block_k
    kv_head = lambda hi: hi // groups
    in_specs = [layout.tile(bq, d), layout.whole(sk, d, kv_head), layout.whole(sk, dv, kv_head)]
    operands = [q, k, v]
    if spec.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda bi, hi, qi: (bi, qi, 0)),
            pl.BlockSpec((None, 1, sk), lambda bi, hi, qi: (bi, 0, 0)),
        ]
        operands += [q_seg, kv_seg]
    kernel = functools.partial(_forward_kernel, spec=spec, scale=scale, block_q=bq, block_k=bk)
    return pl.pallas_call(
        kernel,
        grid=(b, h, tq // bq),
        in_specs=in_specs,
        out_specs=[layout.tile(bq, dv), HEAD_MAJOR.tile(bq, 1)],
        out_shape=[
            jax.ShapeDtypeStruct(layout.array_shape(b, h, tq, dv), q.dtype),
            jax.ShapeDtypeStruct((b, h, tq, 1), jnp.float32),
        ],
        compiler_params=config.compiler_params(target, max(d, dv)),
        interpret=target.interpret,
        name="flash_attention_fwd",
    )(*operands)
