"""The Pallas flash-attention kernel (impl="pallas", interpret mode on CPU).

Outputs and gradients are checked against the float32 impl="xla" form and against a naive
formula written here (float64 numpy for outputs, unblocked float32 jnp for gradients). Tiles are
shrunk to 16 rows so that tiny sequences span several of them: padding, skipped tiles and the
online rescaling across tiles are all exercised.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxlm import ops
from kernels_pallas.flash_attention import BlockSizes, config, flash_attention, tiles
from kernels_pallas.call_layout import equations_outside_kernels, pallas_call_names
from numerics import BF16_GRAD, BF16_OUT, F32_GRAD, F32_OUT, assert_close
from op_cases import attention_formula, attention_mask

SMALL_TILES = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(config, "INTERPRET_BLOCKS", SMALL_TILES)


def use_token_major(monkeypatch) -> None:
    """Run the interpreter on the GPU layout ([B, T, H, D] tiles read in place)."""
    monkeypatch.setattr(config, "token_major", lambda target: True)


def visible(b: int, t_len: int, s_len: int, causal: bool, window, segment_ids=None) -> np.ndarray:
    """[B, T, S] bool straight from the spec (op_cases.attention_mask)."""
    return attention_mask(t_len, s_len, causal=causal, window=window, segment_ids=segment_ids, batch=b)


def naive_np(q, k, v, mask, scale) -> np.ndarray:
    """float64 softmax attention; a query that sees no key gets zeros."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    s = np.where(mask[:, None], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.where(mask[:, None], np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhts,bshv->bthv", p, v)


def normal(seed: int, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    t: int
    h: int
    hk: int
    d: int
    dv: int
    causal: bool = True
    window: int | None = None
    segments: tuple | None = None  # raw ids per row, repeated ids allowed
    s: int | None = None  # key length when it differs from t (cross attention)
    scale: float | None = None

    def inputs(self, seed: int, dtype=jnp.float32):
        s = self.t if self.s is None else self.s
        q = normal(seed, (self.b, self.t, self.h, self.d), dtype)
        k = normal(seed + 1, (self.b, s, self.hk, self.d), dtype)
        v = normal(seed + 2, (self.b, s, self.hk, self.dv), dtype)
        seg = None if self.segments is None else jnp.asarray(self.segments, jnp.int32)
        return q, k, v, seg

    def mask(self, seg) -> np.ndarray:
        return visible(self.b, self.t, self.t if self.s is None else self.s, self.causal, self.window, seg)

    def kwargs(self, seg) -> dict:
        return dict(causal=self.causal, window=self.window, segment_ids=seg, scale=self.scale)


def ids(*lengths_and_ids) -> tuple:
    """ids((3, 0), (1, 5)) -> (0, 0, 0, 5): runs of (length, id)."""
    return tuple(int(i) for n, i in lengths_and_ids for _ in range(n))


CASES = {
    # T=37 pads to 48 (3 tiles); D=24 pads to 32; two query heads per kv head.
    "causal_gqa_odd_t": Case(2, 37, 4, 2, 24, 24),
    # The window skips tiles below the diagonal too; Dv differs from D; explicit scale.
    "causal_window": Case(1, 45, 2, 1, 16, 8, window=7, scale=0.3),
    "causal_window_1_sees_itself": Case(1, 20, 2, 2, 16, 16, window=1),
    # Single-token documents: those queries see only themselves. Row 0 reuses id 0 after id 1,
    # which must start a new document.
    "causal_segments_singletons": Case(
        2, 33, 2, 2, 16, 16,
        segments=(ids((1, 0), (5, 1), (1, 0), (1, 3), (20, 4), (5, 3)), ids((33, 7))),
    ),
    "causal_window_segments_gqa4": Case(
        2, 40, 4, 1, 32, 16, window=9, segments=(ids((17, 0), (23, 1)), ids((3, 2), (30, 5), (7, 6))),
    ),
    "full_segments": Case(2, 24, 2, 1, 16, 16, causal=False, segments=(ids((10, 0), (14, 1)), ids((1, 0), (23, 1)))),
    # Non-causal cross attention with a window: queries t >= 22 see no key and must give zeros.
    "cross_window_rows_without_keys": Case(1, 40, 2, 1, 16, 16, causal=False, window=4, s=19),
    "head_dims_200_256": Case(1, 17, 2, 1, 200, 256, window=12),
}


def _grads(fn, q, k, v, ct):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct), argnums=(0, 1, 2)))(q, k, v)


# Every case in the TPU/interpreter layout; three also in the GPU one.
LAYOUT_CASES = [(name, False) for name in CASES] + [
    (name, True) for name in ("causal_gqa_odd_t", "causal_window_segments_gqa4", "cross_window_rows_without_keys")
]


@pytest.mark.parametrize("name,token_major", LAYOUT_CASES,
                         ids=[f"{n}-{'token' if t else 'head'}_major" for n, t in LAYOUT_CASES])
def test_outputs_and_gradients_match_xla_and_naive_formula(name, token_major, monkeypatch):
    if token_major:
        use_token_major(monkeypatch)
    case = CASES[name]
    q, k, v, seg = case.inputs(0)
    kwargs = case.kwargs(seg)
    scale = case.d**-0.5 if case.scale is None else case.scale
    mask = case.mask(seg)

    o = ops.attention(q, k, v, impl="pallas", **kwargs)
    assert o.shape == (case.b, case.t, case.h, case.dv) and o.dtype == jnp.float32
    assert_close(o, ops.attention(q, k, v, impl="xla", **kwargs), F32_OUT, "o vs xla")
    assert_close(o, naive_np(q, k, v, mask, scale), F32_OUT, "o vs naive")
    hidden = ~mask.any(axis=-1)  # [B, T]: queries that see no key
    np.testing.assert_array_equal(np.asarray(o)[hidden], 0.0)

    ct = normal(9, o.shape)
    got = _grads(lambda q, k, v: ops.attention(q, k, v, impl="pallas", **kwargs), q, k, v, ct)
    assert_close(got, _grads(lambda q, k, v: ops.attention(q, k, v, impl="xla", **kwargs), q, k, v, ct),
                 F32_GRAD, "dq, dk, dv vs xla")
    assert_close(got, _grads(lambda q, k, v: attention_formula(q, k, v, mask, scale), q, k, v, ct),
                 F32_GRAD, "dq, dk, dv vs naive")
    np.testing.assert_array_equal(np.asarray(got[0])[hidden], 0.0)


def test_bf16_against_float32_reference(monkeypatch):
    use_token_major(monkeypatch)  # bf16 is the GPU case, and the GPU layout
    case = CASES["causal_window_segments_gqa4"]
    q, k, v, seg = case.inputs(3, jnp.bfloat16)
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    mask, scale = case.mask(seg), case.d**-0.5
    o = ops.attention(q, k, v, impl="pallas", **case.kwargs(seg))
    assert o.dtype == jnp.bfloat16
    assert_close(o, naive_np(*f32, mask, scale), BF16_OUT, "o")

    ct = normal(4, o.shape)
    got = _grads(lambda q, k, v: ops.attention(q, k, v, impl="pallas", **case.kwargs(seg)), q, k, v, ct)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    assert_close(got, _grads(lambda q, k, v: attention_formula(q, k, v, mask, scale), *f32, ct), BF16_GRAD, "dq, dk, dv")


def test_uneven_forward_and_backward_tiles():
    # Forward tiles 32x16, backward 16x32: T=37 pads to 64 queries and 48 keys.
    case = CASES["causal_gqa_odd_t"]
    q, k, v, seg = case.inputs(5)
    blocks = BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
    fn = lambda q, k, v: flash_attention(q, k, v, causal=True, window=20, block_sizes=blocks)
    mask, scale = visible(case.b, case.t, case.t, True, 20), case.d**-0.5
    assert_close(fn(q, k, v), naive_np(q, k, v, mask, scale), F32_OUT, "o")
    ct = normal(6, (case.b, case.t, case.h, case.dv))
    assert_close(_grads(fn, q, k, v, ct), _grads(lambda *a: attention_formula(*a, mask, scale), q, k, v, ct),
                 F32_GRAD, "dq, dk, dv")


def test_forward_and_backward_run_pallas_kernels():
    q, k, v, _ = CASES["causal_gqa_odd_t"].inputs(7)
    attend = lambda q, k, v: ops.attention(q, k, v, impl="pallas", window=5)
    forward = pallas_call_names(jax.make_jaxpr(attend)(q, k, v).jaxpr)
    assert forward == ["flash_attention_fwd"]
    loss = lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)
    both = pallas_call_names(jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
    assert sorted(both) == ["flash_attention_bwd_dkv", "flash_attention_bwd_dq", "flash_attention_fwd"]
    xla = pallas_call_names(jax.make_jaxpr(lambda *a: ops.attention(*a, window=5))(q, k, v).jaxpr)
    assert xla == []  # impl=None is still "xla"


def test_token_major_layout_reads_inputs_in_place(monkeypatch):
    # The GPU layout tiles [B, T, H, D] directly: no transpose of q, k, v or o around the kernel.
    q, k, v, _ = CASES["causal_gqa_odd_t"].inputs(7)
    trace = lambda: jax.make_jaxpr(lambda q, k, v: ops.attention(q, k, v, impl="pallas"))(q, k, v).jaxpr
    transposes = lambda: sum(e.primitive.name == "transpose" for e in equations_outside_kernels(trace()))
    assert transposes() == 4  # head-major: q, k, v in, o out
    use_token_major(monkeypatch)
    assert transposes() == 0


def _tile_map(causal: bool, window, rows: int, cols: int, bq: int, bk: int) -> np.ndarray:
    """[row tiles, col tiles] bool: the tile holds a (query, key) pair that positions allow."""
    mask = visible(1, rows, cols, causal, window)[0]
    mask = np.pad(mask, ((0, -rows % bq), (0, -cols % bk)))
    return mask.reshape(mask.shape[0] // bq, bq, mask.shape[1] // bk, bk).any(axis=(1, 3))


@pytest.mark.parametrize("causal,window,q_len,kv_len", [
    (True, None, 45, 45), (True, 7, 45, 45), (True, 40, 70, 70), (True, 1, 33, 33),
    (False, None, 37, 21), (False, 5, 40, 19), (False, 30, 50, 64),
])
def test_loop_bounds_visit_exactly_the_tiles_with_visible_positions(causal, window, q_len, kv_len):
    # On the grid of whole tiles the bounds are exact: no tile with a (query, key) pair that
    # causality and the window allow is skipped, and no tile they hide entirely is visited.
    # So every tile with a visible pair of real (unpadded) positions is visited.
    bq, bk = 16, 32
    n_q, n_k = -(-q_len // bq), -(-kv_len // bk)
    spec = tiles.MaskSpec(causal=causal, window=window, q_len=q_len, kv_len=kv_len, kv_padded=True,
                          has_segments=False)
    whole = _tile_map(causal, window, n_q * bq, n_k * bk, bq, bk)
    real = _tile_map(causal, window, q_len, kv_len, bq, bk)
    for i in range(n_q):
        lo, hi = tiles.kv_block_range(spec, i, bq, bk)
        got = set(range(int(lo), int(hi)))
        assert got == set(np.flatnonzero(whole[i])) and got >= set(np.flatnonzero(real[i])), f"query tile {i}"
    for j in range(n_k):
        lo, hi = tiles.q_block_range(spec, j, bq, bk)
        got = set(range(int(lo), int(hi)))
        assert got == set(np.flatnonzero(whole[:, j])) and got >= set(np.flatnonzero(real[:, j])), f"key tile {j}"


def test_default_tiles_match_xla(monkeypatch):
    # The interpret-mode default tiles (128 rows) with T=150: two tiles, the second mostly padding.
    monkeypatch.setattr(config, "INTERPRET_BLOCKS", BlockSizes(128, 128, 128, 128))
    q, k, v, seg = Case(1, 150, 2, 1, 16, 16, segments=(ids((70, 0), (80, 1)),)).inputs(8)
    o = ops.attention(q, k, v, impl="pallas", segment_ids=seg, window=100)
    assert_close(o, ops.attention(q, k, v, impl="xla", segment_ids=seg, window=100), F32_OUT, "o")


def test_bad_arguments_raise():
    q = jnp.zeros((1, 8, 2, 300))
    with pytest.raises(ValueError, match="head dims up to 256"):
        ops.attention(q, q, q, impl="pallas")
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=24, block_k=16, block_q_bwd=16, block_k_bwd=16)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=8, block_k=16, block_q_bwd=16, block_k_bwd=16)
    q = jnp.zeros((1, 256, 2, 16))
    with pytest.raises(ValueError, match="multiples of 128 on TPU"):  # key tiles are lanes there
        flash_attention(q, q, q, block_sizes=SMALL_TILES, interpret=pltpu.InterpretParams())


def _lower_for(platform: str, backend: str, monkeypatch) -> list[str]:
    """Lowers the forward, and forward+backward, for another platform from this CPU (jax.export).

    Returns the two StableHLO module texts, each kernel a custom call holding its lowered IR.
    """
    from jax import export

    monkeypatch.setattr(jax, "default_backend", lambda: backend)  # picks that backend's tiles/params
    q = jax.ShapeDtypeStruct((2, 300, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)
    attend = lambda q, k, v, seg: flash_attention(q, k, v, seg, window=100, interpret=False)
    grads = jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    unchecked = [export.DisabledSafetyCheck.custom_call(t) for t in ("__gpu$xla.gpu.triton", "tpu_custom_call")]
    return [export.export(jax.jit(fn), platforms=[platform], disabled_checks=unchecked)(q, k, k, seg).mlir_module()
            for fn in (attend, grads)]


def test_kernels_lower_to_triton_for_gpu(monkeypatch):
    # Lowering only (Pallas -> Triton IR); compiling that IR needs a GPU.
    fwd, both = _lower_for("cuda", "gpu", monkeypatch)
    assert fwd.count("custom_call @__gpu$xla.gpu.triton") == 1
    assert both.count("custom_call @__gpu$xla.gpu.triton") == 3


def test_kernels_lower_to_mosaic_for_tpu(monkeypatch):
    # Lowering only (Pallas -> Mosaic MLIR, as on a TPU v5e); Mosaic's own compiler runs on a TPU.
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not hasattr(tpu_info, "registry"):
        pytest.skip("this jax cannot describe a TPU to lower for without one")
    monkeypatch.setitem(tpu_info.registry, "cpu", lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    fwd, both = _lower_for("tpu", "tpu", monkeypatch)
    assert fwd.count("custom_call @tpu_custom_call") == 1 and both.count("custom_call @tpu_custom_call") == 3
