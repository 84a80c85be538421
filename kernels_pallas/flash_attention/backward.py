"""The backward kernels: dq per query tile, and dk, dv per key tile.

Both recompute the probabilities P = exp(scale·q kᵀ − lse) from the saved log-sum-exp, and use
delta = rowsum(dO ∘ O), so that dS = P ∘ (dO vᵀ − delta) and
dq = scale·dS k, dk = scale·dSᵀ q, dv = Pᵀ dO. Splitting the two (rather than one kernel with
atomic adds) keeps each output written by exactly one program, which every backend supports.
For grouped-query attention a dk/dv program walks all query heads of its group, so the kv
gradients come out summed over the group without a [B, H, S, D] intermediate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.flash_attention import config, tiles
from kernels_pallas.flash_attention.layout import HEAD_MAJOR, Layout
from kernels_pallas.settings import Target


def _probabilities(spec, q, k, lse, q_start, k_start, rows, cols, scale, q_seg, kv_seg):
    """P [rows, cols] float32, zero where masked (masked before exp: no inf ever appears)."""
    s = tiles.dot_nt(q, k) * scale
    mask = tiles.visible(spec, q_start, k_start, rows, cols, q_seg, kv_seg)
    if mask is not None:
        s = jnp.where(mask, s, tiles.MASKED)
    return jnp.exp(s - lse)


def _dq_kernel(*refs, spec: tiles.MaskSpec, scale: float, block_q: int, block_k: int):
    if spec.has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref = refs
        q_seg = q_seg_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        kv_seg_ref = q_seg = None
    q_block = pl.program_id(2)
    q_start = q_block * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]

    def step(kv_block, dq):
        k_start = pl.multiple_of(kv_block * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        k = k_ref[keys, :]
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, keys]
        p = _probabilities(spec, q, k, lse, q_start, k_start, block_q, block_k, scale, q_seg, kv_seg)
        ds = p * (tiles.dot_nt(do, v_ref[keys, :]) - delta)
        return dq + tiles.dot_nn(ds, k)

    lo, hi = tiles.kv_block_range(spec, q_block, block_q, block_k)
    dq = jax.lax.fori_loop(lo, hi, step, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, spec: tiles.MaskSpec, scale: float, block_q: int, block_k: int, groups: int, layout: Layout):
    if spec.has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
        kv_seg = kv_seg_ref[...]  # [1, bk]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
        q_seg_ref = kv_seg = None
    kv_block = pl.program_id(2)
    k_start = kv_block * block_k
    k, v = k_ref[...], v_ref[...]  # [bk, D], [bk, Dv]
    lo, hi = tiles.q_block_range(spec, kv_block, block_q, block_k)

    def head(g, carry):
        def step(q_block, carry):
            dk, dv = carry
            q_start = pl.multiple_of(q_block * block_q, block_q)
            rows = pl.ds(q_start, block_q)
            q, do = layout.read_group(q_ref, g, rows), layout.read_group(do_ref, g, rows)
            q_seg = None if q_seg_ref is None else q_seg_ref[rows, :]
            lse = HEAD_MAJOR.read_group(lse_ref, g, rows)
            p = _probabilities(spec, q, k, lse, q_start, k_start, block_q, block_k, scale, q_seg, kv_seg)
            ds = p * (tiles.dot_nt(do, v) - HEAD_MAJOR.read_group(delta_ref, g, rows))
            return dk + tiles.dot_nn(ds.T, q), dv + tiles.dot_nn(p.T, do)

        return jax.lax.fori_loop(lo, hi, step, carry)

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, groups, head, init)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, do, lse, delta, *, spec: tiles.MaskSpec, scale: float,
             blocks: config.BlockSizes, layout: Layout, target: Target):
    """Gradients of the forward's o. q, k, v, segments and layout as for ``forward``; do like o;
    lse, delta [B, H, Tq, 1] float32. Returns dq, dk, dv shaped and typed like q, k, v.
    """
    b, h, tq, d = layout.dims(q.shape)
    _, hk, sk, dv_dim = layout.dims(v.shape)
    groups = h // hk
    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
    params = config.compiler_params(target, max(d, dv_dim))
    kernel_args = dict(spec=spec, scale=scale, block_q=bq, block_k=bk)
    segs = [q_seg, kv_seg] if spec.has_segments else []

    # One program per (batch, query head, query tile), reading all keys of its kv head.
    kv_head = lambda hi: hi // groups
    seg_specs = [
        pl.BlockSpec((None, bq, 1), lambda bi, hi, i: (bi, i, 0)),
        pl.BlockSpec((None, 1, sk), lambda bi, hi, i: (bi, 0, 0)),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kernel_args),
        grid=(b, h, tq // bq),
        in_specs=[layout.tile(bq, d), layout.whole(sk, d, kv_head), layout.whole(sk, dv_dim, kv_head),
                  layout.tile(bq, dv_dim), HEAD_MAJOR.tile(bq, 1), HEAD_MAJOR.tile(bq, 1)]
        + (seg_specs if spec.has_segments else []),
        out_specs=layout.tile(bq, d),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=target.interpret,
        name="flash_attention_bwd_dq",
    )(q, k, v, do, lse, delta, *segs)

    # One program per (batch, kv head, key tile), reading all query rows of its head group.
    seg_specs = [
        pl.BlockSpec((None, tq, 1), lambda bi, hi, j: (bi, 0, 0)),
        pl.BlockSpec((None, 1, bk), lambda bi, hi, j: (bi, 0, j)),
    ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, groups=groups, layout=layout, **kernel_args),
        grid=(b, hk, sk // bk),
        in_specs=[layout.group(groups, tq, d), layout.tile(bk, d), layout.tile(bk, dv_dim),
                  layout.group(groups, tq, dv_dim), HEAD_MAJOR.group(groups, tq, 1), HEAD_MAJOR.group(groups, tq, 1)]
        + (seg_specs if spec.has_segments else []),
        out_specs=[layout.tile(bk, d), layout.tile(bk, dv_dim)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=target.interpret,
        name="flash_attention_bwd_dkv",
    )(q, k, v, do, lse, delta, *segs)
    return dq, dk, dv
