"""kernels_pallas.kda (Kimi Delta Attention: the gated delta rule with a per-key-channel gate) in
the HLO interpreter, in the kernel layout [BH, T, D]: the output and final state against a float64
numpy token loop, and the gradients of q, k, v, the log gates g (through the chunk-local cumsums
the kernel takes), beta and the initial state against ``jax.grad`` of a float32 ``lax.scan`` token
loop. With a document reset mid-chunk and one on a chunk boundary; strong gates (channels whose
cumsum falls far below the float32 exp range inside a chunk, gates of −1e4 and −inf turned into
per-channel resets by the gate-cumsum convention, gates of exactly 0); chunks of 16 and 32 (one
and two 16-token sub-blocks); both drivers and split value blocks. Also: the kernel lowers for GPU
(Triton) and TPU (Mosaic) from CPU."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.gate_cumsum import chunk_cumsums
from jaxlm.ops.sequence import RESET_LOG_DECAY
from kernels_pallas import kernel_settings
from kernels_pallas.kda import kda
from numerics import F32_GRAD, F32_OUT, assert_close

BH, T, K, V = 2, 64, 16, 32
# Document starts (row, token): mid-chunk for chunks of 16 and of 32, and on a chunk boundary.
RESETS = ((0, 21), (1, 32), (1, 40))
DIFF = ("q", "k", "v", "g", "beta", "s0")


def make_inputs(seed: int, strong: bool = False) -> dict:
    """q already scaled, unit-norm keys, log-sigmoid gates per key channel, beta in (0, 1).

    strong: channel 0 decays by −20 per token (its cumsum reaches −300 within 16 tokens, so
    exp(b_t)·exp(−b_s) would overflow), ~10% of the gates are −1e4, a few −inf (both resets of
    their channel), some exactly 0.
    """
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    k = jax.random.normal(ks[1], (BH, T, K))
    x = dict(
        q=jax.random.normal(ks[0], (BH, T, K)) * K**-0.5,
        k=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        v=jax.random.normal(ks[2], (BH, T, V)),
        g=jax.nn.log_sigmoid(2.0 + 2.0 * jax.random.normal(ks[3], (BH, T, K))),
        beta=jax.nn.sigmoid(jax.random.normal(ks[4], (BH, T))),
        s0=jax.random.normal(ks[5], (BH, K, V)),
    )
    if strong:
        rng = np.random.default_rng(seed)
        g = np.array(x["g"])
        g[:, :, 0] = -20.0
        g[rng.random(g.shape) < 0.1] = -1e4
        g[rng.random(g.shape) < 0.1] = 0.0
        g[0, 16, :4] = -1e4  # on a chunk boundary
        g[0, 5, 3] = g[1, 27, 7] = g[1, 50, :] = -np.inf
        x["g"] = jnp.asarray(g)
    reset = np.zeros((BH, T), bool)
    for row, t in RESETS:
        reset[row, t] = True
    x["reset"] = jnp.asarray(reset)
    return x


def kernel_cumsums(g: jax.Array, reset: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """The kernel's b and n [BH, T, K]: chunk-local reset-aware cumsums of g (gate_cumsum)."""
    lead = (g.shape[0] * (g.shape[1] // chunk), chunk)
    b, n = chunk_cumsums(g.reshape(*lead, g.shape[2]), reset.reshape(*lead, 1))
    return b.reshape(g.shape), n.reshape(g.shape)


def numpy_reference(x: dict) -> tuple[np.ndarray, np.ndarray]:
    """The token loop in float64: reset, S <- Diag(exp(g_t)) S, delta-rule write, read."""
    f64 = {name: np.asarray(a, np.float64) for name, a in x.items() if name != "reset"}
    reset = np.asarray(x["reset"])
    o = np.zeros((BH, T, V))
    s_final = np.zeros((BH, K, V))
    for h in range(BH):
        s = f64["s0"][h].copy()
        for t in range(T):
            if reset[h, t]:
                s[:] = 0.0
            s *= np.exp(f64["g"][h, t])[:, None]
            k_t = f64["k"][h, t]
            u = f64["beta"][h, t] * (f64["v"][h, t] - s.T @ k_t)
            s += np.outer(k_t, u)
            o[h, t] = s.T @ f64["q"][h, t]
        s_final[h] = s
    return o, s_final


def scan_reference(q, k, v, g, beta, s0, reset):
    """The same token loop as a float32 ``lax.scan`` (differentiable): o [BH, T, V], S [BH, K, V]."""

    def step(s, xs):
        q_t, k_t, v_t, g_t, beta_t, reset_t = xs
        s = jnp.where(reset_t[:, None, None], 0.0, s) * jnp.exp(g_t)[:, :, None]
        u = beta_t[:, None] * (v_t - jnp.einsum("hk,hkv->hv", k_t, s))
        s = s + k_t[:, :, None] * u[:, None, :]
        return s, jnp.einsum("hk,hkv->hv", q_t, s)

    xs = tuple(jnp.swapaxes(a, 0, 1) for a in (q, k, v, g, beta, reset))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.swapaxes(o, 0, 1), s


def kernel_form(q, k, v, g, beta, s0, reset, *, chunk, **options):
    b, n = kernel_cumsums(g, reset, chunk)
    return kda(q, k, v, b, n, beta[..., None], s0, chunk=chunk, **options)


def _loss(diff, reset, run):
    o, s = run(*(diff[name] for name in DIFF), reset)
    wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
    return jnp.sum(o * wo) + jnp.sum(s * ws), (o, s)


@functools.cache
def evaluate_fn(chunk: int | None):
    """jit of ((o, S), gradients) of a fixed projection of (o, S): the kernel for a chunk, or
    the scan reference for None."""
    run = scan_reference if chunk is None else functools.partial(kernel_form, chunk=chunk)

    def evaluate(x):
        diff = {name: x[name] for name in DIFF}
        (_, out), grads = jax.value_and_grad(_loss, has_aux=True)(diff, x["reset"], run)
        return out, grads

    return jax.jit(evaluate)


def check_against_references(x: dict, chunk: int) -> None:
    o, s = evaluate_fn(chunk)(x)[0]
    o_ref, s_ref = numpy_reference(x)
    assert_close(o, o_ref, F32_OUT, "o")
    assert_close(s, s_ref, F32_OUT, "final state")
    (o_scan, s_scan), d_scan = evaluate_fn(None)(x)
    assert_close(o_scan, o_ref, F32_OUT, "scan o")  # the gradient reference computes the same function
    _, d = evaluate_fn(chunk)(x)
    for name in DIFF:
        assert_close(d[name], d_scan[name], F32_GRAD, f"d{name}")


@pytest.mark.parametrize("chunk", [16, 32])
def test_matches_references(chunk):
    """Four chunks of one sub-block, or two chunks of two (the earlier sub-block factored
    through the later one's first row); resets mid-chunk and on a chunk boundary."""
    check_against_references(make_inputs(seed=1), chunk)


@pytest.mark.parametrize("chunk", [16, 32])
def test_strong_gates(chunk):
    """Cumsums far below exp's float32 range inside a chunk, gates of −1e4 and −inf (per-channel
    resets, whose gradient is exactly 0 in both forms) and of 0: finite and still correct."""
    x = make_inputs(seed=2, strong=True)
    b, n = kernel_cumsums(x["g"], x["reset"], chunk)
    assert float(jnp.min(b)) < -2 * 88.0  # exp(-b) and even exp(b_t)/exp(b_s) would overflow float32
    assert bool(jnp.all(jnp.isfinite(b)))
    assert float(jnp.max(n[:, :, 3])) >= 1.0  # the −inf and −1e4 gates are resets of their channel
    (o, s), d = evaluate_fn(chunk)(x)
    chex.assert_tree_all_finite((o, s, d))
    hard = np.asarray(x["g"]) <= RESET_LOG_DECAY
    assert np.all(np.asarray(d["g"])[hard] == 0.0)
    check_against_references(x, chunk)


def test_grid_driver_and_value_blocks():
    """The TPU driver (chunks on a sequential grid axis, state in scratch) in the HLO interpreter,
    with V split into two 16-column value blocks, whose key-side cotangents are partial sums."""
    x = make_inputs(seed=3, strong=True)
    with kernel_settings(driver="grid", block_v=16):
        run = jax.jit(jax.value_and_grad(lambda d: _loss(d, x["reset"], functools.partial(kernel_form, chunk=32)),
                                         has_aux=True))
        (_, (o, s)), d = run({name: x[name] for name in DIFF})
    (o_ref, s_ref), d_ref = evaluate_fn(32)(x)
    assert_close(o, o_ref, F32_OUT, "o")
    assert_close(s, s_ref, F32_OUT, "final state")
    for name in DIFF:
        assert_close(d[name], d_ref[name], F32_GRAD, f"d{name}")


def test_state_chaining():
    """Two halves with the first half's final state carried equal the whole sequence."""
    x = make_inputs(seed=4)
    b, n = kernel_cumsums(x["g"], x["reset"], 16)
    args = (x["q"], x["k"], x["v"], b, n, x["beta"][..., None])
    o, s = kda(*args, x["s0"], chunk=16)
    half = T // 2
    o1, s1 = kda(*(a[:, :half] for a in args), x["s0"], chunk=16)
    o2, s2 = kda(*(a[:, half:] for a in args), s1, chunk=16)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, F32_OUT, "o")
    assert_close(s2, s, F32_OUT, "final state")


def test_bad_inputs_raise():
    x = jnp.zeros((1, 16, 16))
    v, s0 = jnp.zeros((1, 16, 32)), jnp.zeros((1, 16, 32))
    with pytest.raises(ValueError, match="b must be"):
        kda(x, x, v, x[..., :1], x, x[..., :1], s0, chunk=16)
    with pytest.raises(ValueError, match="beta must be"):
        kda(x, x, v, x, x, x, s0, chunk=16)
    with pytest.raises(ValueError, match="multiple of the chunk"):
        kda(x, x, v, x, x, x[..., :1], s0, chunk=32)


def check_lowers(platform: str, backend: str) -> None:
    """Lowers the kernel's value and gradients with jax.export from this CPU for another
    platform, with 128-column value blocks of V=256, and finds its three kernels in the text."""
    from jax import export

    bh, t, dk, dv = 2, 128, 128, 256
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    key = f32((bh, t, dk))
    args = [key, key, f32((bh, t, dv)), key, key, f32((bh, t, 1)), f32((bh, dk, dv))]

    def loss(*a):
        o, s = kda(*a, chunk=64)
        return jnp.sum(o) + jnp.sum(s)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 5, 6)))
    custom_call = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}[platform]
    with kernel_settings(backend=backend, interpret=False, block_v=128):
        unchecked = [export.DisabledSafetyCheck.custom_call(custom_call)]
        text = export.export(fn, platforms=[platform], disabled_checks=unchecked)(*args).mlir_module()
    assert text.count(f"custom_call @{custom_call}") == 3  # forward, states, backward
    for kernel in ("kda_forward", "kda_states_forward", "kda_backward"):
        assert kernel in text, kernel


def test_kernel_lowers_to_triton_for_gpu():
    # Lowering only (Pallas -> Triton IR, "loop" driver); compiling that IR needs a GPU.
    check_lowers("cuda", "gpu")


def test_kernel_lowers_to_mosaic_for_tpu(monkeypatch):
    # Lowering only (Pallas -> Mosaic MLIR, "grid" driver, as on a TPU v5e).
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not hasattr(tpu_info, "registry"):
        pytest.skip("this jax cannot describe a TPU to lower for without one")
    v5e = lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
    monkeypatch.setitem(tpu_info.registry, "cpu", v5e)
    check_lowers("tpu", "tpu")
