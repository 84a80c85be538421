"""The shared test base of the ops: shapes, inputs as real layers give them, packed documents,
float64 references, tolerances by kind of result, and one check for every registered form of
every op's FormTable against its reference, so that a new form is tested by registering it.

Recurrences are compared with their recurrent form, which is itself checked against the float64
loop here; softmax attention, cached attention and the grouped experts with float64 references.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import ops
from jaxlm.ops.attention import ATTENTION_FORMS, CACHED_ATTENTION_FORMS
from jaxlm.ops.delta.api import DELTA_RULE_FORMS, GATED_DELTA_RULE_FORMS, KDA_FORMS
from jaxlm.ops.dispatch import FormTable
from jaxlm.ops.gla.api import GLA_FORMS, LINEAR_ATTN_FORMS, SIMPLE_GLA_FORMS
from jaxlm.ops.moe.experts import GROUPED_EXPERT_FORMS, grouped_experts
from numerics import BF16_GATE_GRAD, BF16_GRAD, BF16_OUT, F32_GRAD, F32_OUT, assert_close


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Relative RMS tolerances of one comparison: outputs and final states, the gradients of q, k,
    v and the initial state, and the gradients of gates and β."""

    out: float
    grad: float
    gate_grad: float


F32 = Tolerances(F32_OUT, F32_GRAD, F32_GRAD)
BF16 = Tolerances(BF16_OUT, BF16_GRAD, BF16_GATE_GRAD)  # bf16 inputs against the float32 reference
GATE_INPUTS = ("g", "gk", "beta")

# ------------------------------------------------------------------------ linear recurrences

# (B, T, H, HV, K, V): odd T, two value heads per q/k head, K and V not powers of two.
GROUPED = (2, 37, 2, 4, 6, 5)
# HV == H, T a whole number of 8- and 16-token chunks.
SQUARE = (1, 40, 2, 2, 8, 8)
# Packed documents of a [2, 37] batch: one starts mid-chunk (9), two on the boundary of 8- and
# 16-token chunks (16).
SEGMENTS = np.array([[0] * 9 + [1] * 7 + [2] * 21, [3] * 16 + [4] * 21], np.int32)
# The inputs that have a time axis, [B, T, ...].
TOKEN_INPUTS = ("q", "k", "v", "g", "gk", "beta")


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def make_inputs(shape: tuple[int, ...], seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every recurrence's inputs, numpy, as real layers give them: q; unit-norm keys (the delta
    rule needs them); v; log-sigmoid gates g [B, T, HV] and gk [B, T, HV, K]; β = sigmoid. Those
    in ``dtype``; gamma [HV] (a constant log decay per head) and s0 [B, HV, K, V] in float32."""
    b, t, h, hv, dk, dv = shape
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(b, t, h, dk))
    x = dict(
        q=rng.normal(size=(b, t, h, dk)),
        k=k / np.linalg.norm(k, axis=-1, keepdims=True),
        v=rng.normal(size=(b, t, hv, dv)),
        g=_log_sigmoid(2.0 + 2.0 * rng.normal(size=(b, t, hv))),
        gk=_log_sigmoid(2.0 + 2.0 * rng.normal(size=(b, t, hv, dk))),
        beta=1.0 / (1.0 + np.exp(-rng.normal(size=(b, t, hv)))),
    )
    x = {n: a.astype(dtype) for n, a in x.items()}
    x["gamma"] = -np.linspace(0.01, 0.5, hv, dtype=np.float32)
    x["s0"] = rng.normal(size=(b, hv, dk, dv)).astype(np.float32)
    return x


def time_slice(x: dict, index) -> dict:
    """The inputs with the time axis of the per-token ones sliced (gamma and s0 kept)."""
    return {n: (a[:, index] if n in TOKEN_INPUTS else a) for n, a in x.items()}


@dataclasses.dataclass(frozen=True)
class Recurrence:
    """One recurrence op as the tests call it.

    table: its forms. call(x, **common) -> (o, S), x as make_inputs gives it. reads: the inputs
    it takes (its gradients are those of these). log_decay(x): the float64 log decay of the
    reference loop, [B, T, HV, 1] or [B, T, HV, K]. delta: the delta rule's correcting write.
    """

    table: FormTable
    call: Callable[..., tuple]
    reads: tuple[str, ...]
    log_decay: Callable[[dict], np.ndarray]
    delta: bool = False


def _f64(a) -> np.ndarray:
    return np.asarray(np.asarray(a, np.float32), np.float64)


def _no_decay(x) -> np.ndarray:
    b, t, hv = np.shape(x["v"])[:3]
    return np.zeros((b, t, hv, 1))


RECURRENCES = {
    "linear_attn": Recurrence(
        LINEAR_ATTN_FORMS, lambda x, **kw: ops.linear_attn(x["q"], x["k"], x["v"], **kw), ("q", "k", "v", "s0"),
        _no_decay,
    ),
    "simple_gla": Recurrence(
        SIMPLE_GLA_FORMS, lambda x, **kw: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], **kw),
        ("q", "k", "v", "g", "s0"), lambda x: _f64(x["g"])[..., None],
    ),
    # A gate per step and a constant one per head together: the decays add.
    "simple_gla_gamma": Recurrence(
        SIMPLE_GLA_FORMS, lambda x, **kw: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], g_gamma=x["gamma"], **kw),
        ("q", "k", "v", "g", "s0"), lambda x: (_f64(x["g"]) + _f64(x["gamma"]))[..., None],
    ),
    "gla": Recurrence(
        GLA_FORMS, lambda x, **kw: ops.gla(x["q"], x["k"], x["v"], x["gk"], **kw), ("q", "k", "v", "gk", "s0"),
        lambda x: _f64(x["gk"]),
    ),
    "delta_rule": Recurrence(
        DELTA_RULE_FORMS, lambda x, **kw: ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw),
        ("q", "k", "v", "beta", "s0"), _no_decay, delta=True,
    ),
    "gated_delta_rule": Recurrence(
        GATED_DELTA_RULE_FORMS,
        lambda x, **kw: ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw),
        ("q", "k", "v", "g", "beta", "s0"), lambda x: _f64(x["g"])[..., None], delta=True,
    ),
    "kda": Recurrence(
        KDA_FORMS, lambda x, **kw: ops.kda(x["q"], x["k"], x["v"], x["gk"], x["beta"], **kw),
        ("q", "k", "v", "gk", "beta", "s0"), lambda x: _f64(x["gk"]), delta=True,
    ),
}
REFERENCE_FORM = "recurrent"


def reference(op: str, x: dict, segment_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """The float64 loop over tokens, straight from the definitions, from x["s0"]: per token,
    S ← diag(exp(g_t)) S (zeroed first where a document starts), then S ← S + k_t v_tᵀ, or for
    the delta rules S ← S + k_t (β_t (v_t − Sᵀk_t))ᵀ, then o_t = Sᵀ(K^-1/2 q_t). Returns (o, S)."""
    rec = RECURRENCES[op]
    q, k, v = (_f64(x[n]) for n in ("q", "k", "v"))
    b, t, h, dk = q.shape
    groups = v.shape[2] // h
    q = np.repeat(q, groups, axis=2) * dk**-0.5
    k = np.repeat(k, groups, axis=2)
    decay = np.exp(rec.log_decay(x))[..., None]  # [B, T, HV, K or 1, 1]
    beta = _f64(x["beta"])[..., None] if rec.delta else None
    s = _f64(x["s0"]).copy()
    o = np.zeros(v.shape)
    for i in range(b):
        for step in range(t):
            if segment_ids is not None and step > 0 and segment_ids[i, step] != segment_ids[i, step - 1]:
                s[i] = 0.0
            s[i] = decay[i, step] * s[i]
            u = v[i, step]
            if rec.delta:
                u = beta[i, step] * (u - np.einsum("hk,hkv->hv", k[i, step], s[i]))
            s[i] = s[i] + k[i, step][..., None] * u[:, None, :]
            o[i, step] = np.einsum("hk,hkv->hv", q[i, step], s[i])
    return o, s


def check_recurrent_form(op: str, x: dict, segment_ids, transform) -> None:
    """The recurrent form, run through transform (chex's variant: with or without jit), against
    the float64 loop: o and the final state, both float32."""
    o, s = transform(functools.partial(run, op, impl=REFERENCE_FORM, segment_ids=segment_ids))(x)
    o_ref, s_ref = reference(op, x, segment_ids)
    chex.assert_type([o, s], jnp.float32)
    assert_close(o, o_ref, F32_OUT, f"{op} o")
    assert_close(s, s_ref, F32_OUT, f"{op} final state")


def common(impl, chunk_size: int = 64, segment_ids=None, final_state: bool = True) -> dict:
    """The keyword arguments every recurrence shares, with x["s0"] as the initial state."""
    return dict(impl=impl, chunk_size=chunk_size, segment_ids=segment_ids, output_final_state=final_state)


def run(op: str, x: dict, impl, chunk_size: int = 64, segment_ids=None, initial_state: bool = True):
    """(o, S) of one call, un-jitted; initial_state=False starts from zeros."""
    s0 = x["s0"] if initial_state else None
    return RECURRENCES[op].call(x, initial_state=s0, **common(impl, chunk_size, segment_ids))


@functools.cache
def forward_fn(op: str, impl, chunk_size: int = 64):
    """jit of (x, segment_ids) -> (o, S) from x["s0"], shared by every test with these arguments."""
    return jax.jit(lambda x, segment_ids: run(op, x, impl, chunk_size, segment_ids))


def projection_loss(o: jax.Array, s: jax.Array) -> jax.Array:
    """A fixed projection of (o, S), whose gradient reaches every output and the final state."""
    wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
    return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws)


def evaluate(op: str, impl, chunk_size: int = 64) -> Callable:
    """(x, segment_ids) -> ((o, S), {input: gradient of projection_loss}) over the inputs the op
    reads, un-jitted."""
    reads = RECURRENCES[op].reads

    def loss(diff, rest, segment_ids):
        o, s = run(op, {**rest, **diff}, impl, chunk_size, segment_ids)
        return projection_loss(o, s), (o, s)

    def evaluate(x, segment_ids):
        diff = {n: x[n] for n in reads}
        rest = {n: a for n, a in x.items() if n not in reads}
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(diff, rest, segment_ids)
        return out, grads

    return evaluate


@functools.cache
def evaluate_fn(op: str, impl, chunk_size: int = 64) -> Callable:
    """jit of ``evaluate``, shared by every test with these arguments: one compile gives the
    outputs and the gradients."""
    return jax.jit(evaluate(op, impl, chunk_size))


def check_form(
    op: str, impl, x: dict, segment_ids=None, chunk_size: int = 64, tol: Tolerances = F32, transform=None,
    gradients: bool = True,
) -> None:
    """A form's o, final state and every input's gradient against the recurrent form's on the
    same values in float32 (so bf16 inputs measure the form's own error, not their rounding).
    transform: how the form runs (jax.jit, or chex's variant); None, the cached jit.
    gradients=False compares o and the final state only."""
    x_ref = {n: np.asarray(a, np.float32) for n, a in x.items()}
    (o_ref, s_ref), d_ref = evaluate_fn(op, REFERENCE_FORM)(x_ref, segment_ids)
    if gradients:
        run_form = evaluate_fn(op, impl, chunk_size) if transform is None else transform(evaluate(op, impl, chunk_size))
        (o, s), d = run_form(x, segment_ids)
    else:
        o, s = (transform or jax.jit)(lambda x, seg: run(op, x, impl, chunk_size, seg))(x, segment_ids)
        d = {}
    what = f"{op} impl={impl!r} chunk_size={chunk_size}"
    chex.assert_type([o, s], [x["v"].dtype, jnp.float32])
    assert_close(o, o_ref, tol.out, f"{what}: o")
    assert_close(s, s_ref, tol.out, f"{what}: final state")
    for name, grad in d.items():
        assert_close(grad, d_ref[name], tol.gate_grad if name in GATE_INPUTS else tol.grad, f"{what}: d{name}")


# Chunk sizes each form runs at in the every-form check; a form not named here runs at 64.
CHUNK_SIZES = {"chunk": (8, 16, 64), "pallas": (16,)}
# (inputs, segment_ids, whether every chunk size runs) of the every-form check: grouped heads
# with documents at each chunk size, then HV == H without documents at the first one.
RECURRENCE_CASES = {"grouped": (GROUPED, SEGMENTS, True), "square": (SQUARE, None, False)}
# Without jit every op is dispatched alone: one tiny case (two documents, two 8-token chunks),
# outputs and final states only.
TINY_CASES = {"tiny": ((1, 10, 1, 2, 4, 3), np.array([[0] * 4 + [1] * 6], np.int32), False)}


def _recurrence_checks(cases: dict, gradients: bool):
    for op, rec in RECURRENCES.items():
        for form in rec.table.names:
            if form == REFERENCE_FORM:
                continue
            for case, (shape, segment_ids, every_size) in cases.items():
                sizes = CHUNK_SIZES.get(form, (64,))
                for chunk_size in sizes if every_size else sizes[:1]:
                    check = functools.partial(
                        _check_recurrence_form, op, form, shape, segment_ids, chunk_size, gradients
                    )
                    yield f"{op}-{form}-C{chunk_size}-{case}", check


def _check_recurrence_form(op, form, shape, segment_ids, chunk_size, gradients, transform):
    check_form(op, form, make_inputs(shape, 1), segment_ids, chunk_size, transform=transform, gradients=gradients)


# ------------------------------------------------------------------------ softmax attention


def normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    # numpy draws: eager jax.random would compile anew for every test shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def make_qkv(seed: int, b: int, t: int, s: int, h: int, hk: int, d: int, dv: int, dtype=jnp.float32):
    """q [B, T, H, D], k [B, S, Hk, D], v [B, S, Hk, Dv]."""
    shapes = ((b, t, h, d), (b, s, hk, d), (b, s, hk, dv))
    return tuple(normal(seed * 3 + i, shape, dtype) for i, shape in enumerate(shapes))


def segments_from_lengths(rows) -> jax.Array:
    """[[3, 5], [8]] -> [B, T] ids, one run of ids per document."""
    return jnp.asarray([np.repeat(np.arange(len(r)), r) for r in rows], jnp.int32)


def attention_mask(t_len: int, s_len: int, *, causal: bool, window=None, segment_ids=None, batch: int = 1):
    """[B, T, S] bool straight from the spec: causal (s <= t, with a window t − window < s),
    or a window |t − s| < window without causality; and the same document, a document being a
    run of equal ids."""
    t = np.arange(t_len)[:, None]
    s = np.arange(s_len)[None, :]
    mask = np.ones((t_len, s_len), bool)
    if causal:
        mask &= s <= t
        if window is not None:
            mask &= t - window < s
    elif window is not None:
        mask &= np.abs(t - s) < window
    mask = np.broadcast_to(mask, (batch, t_len, s_len)).copy()
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        runs = np.concatenate([np.zeros((seg.shape[0], 1), int), np.cumsum(seg[:, 1:] != seg[:, :-1], 1)], 1)
        mask &= runs[:, :, None] == runs[:, None, :]
    return mask


def attention_reference(q, k, v, mask, scale=None) -> np.ndarray:
    """float64 softmax attention over the keys ``mask`` [B, T, S] allows; a query that sees no
    key gets zeros. q [B, T, H, D]; k, v [B, S, Hk, ·] with H a multiple of Hk."""
    q, k, v = (_f64(a) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    allowed = np.asarray(mask)[:, None]
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhts,bshv->bthv", p, v)


def attention_formula(q, k, v, mask, scale=None) -> jax.Array:
    """The unblocked formula in float32 jnp, for gradients; queries without keys give zeros."""
    groups = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * scale
    allowed = jnp.asarray(mask)[:, None]
    s = jnp.where(allowed, s, -1e30)
    p = jnp.where(allowed, jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True))), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bhts,bshv->bthv", p, v, precision="highest")


# Two rows of 20 tokens: two documents, then one.
SEGMENTS_20 = np.array([[0] * 7 + [1] * 13, [2] * 20], np.int32)


def _check_attention_form(impl: str, transform, gradients: bool = True) -> None:
    """GQA, a window of 6 and packed documents: o (and with gradients dq, dk, dv) against the
    float64 softmax (and the float32 formula)."""
    q, k, v = make_qkv(2, 2, 20, 20, 4, 2, 8, 8)
    mask = attention_mask(20, 20, causal=True, window=6, segment_ids=SEGMENTS_20, batch=2)
    attend = functools.partial(ops.attention, window=6, segment_ids=SEGMENTS_20, impl=impl)
    assert_close(transform(attend)(q, k, v), attention_reference(q, k, v, mask), F32_OUT, f"attention {impl} o")
    if not gradients:
        return
    ct = normal(3, (2, 20, 4, 8))

    def grads(fn, transform):
        return transform(jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2)))(q, k, v)

    assert_close(grads(attend, transform), grads(lambda *a: attention_formula(*a, mask), jax.jit),
                 F32_GRAD, f"attention {impl} dq, dk, dv")


def _check_cached_attention_form(impl: str, transform) -> None:
    """A prefill of 6 tokens into an 8-slot cache, then 3 decode steps, each against the float64
    softmax over every token so far."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(1, 9, 2 * h, 4)).astype(np.float32) for h in (2, 1, 1))
    cache = ops.KVCache.empty(1, 2, 8, 4, 4, jnp.float32)
    attend = transform(functools.partial(ops.cached_attention, impl=impl))
    outs = []
    o, cache = attend(q[:, :6], k[:, :6], v[:, :6], cache)
    outs.append(o)
    for t in range(6, 9):
        o, cache = attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], cache)
        outs.append(o)
    # 9 tokens in 8 slots: the last step no longer sees token 0.
    t = np.arange(9)
    allowed = (t[:, None] >= t[None, :]) & ~((t[:, None] == 8) & (t[None, :] == 0))
    assert_close(jnp.concatenate(outs, axis=1), attention_reference(q, k, v, allowed[None]), F32_OUT,
                 f"cached_attention {impl}")


# ------------------------------------------------------------------------ short convolution


def conv_inputs(seed: int, b: int = 2, t: int = 9, d: int = 6, w: int = 4):
    """x [B, T, D], weight [D, W], bias [D], initial state [B, W-1, D], float32."""
    return normal(seed, (b, t, d)), normal(seed + 1, (d, w)), normal(seed + 2, (d,)), normal(seed + 3, (b, w - 1, d))


def conv_reference(x, weight, bias=None, activation="silu", initial_state=None):
    """Loops straight from the definition, in float64: y_t = act(bias + Σ_i weight[:, i]·x_{t-(W-1)+i}),
    inputs before t=0 read from the state (oldest first). Returns (y, final state)."""
    x, weight = _f64(x), _f64(weight)
    b, t, d = x.shape
    w = weight.shape[1]
    init = np.zeros((b, w - 1, d)) if initial_state is None else _f64(initial_state)

    def x_at(bi, pos):
        return x[bi, pos] if pos >= 0 else init[bi, pos + w - 1]

    y = np.zeros((b, t, d))
    for bi in range(b):
        for ti in range(t):
            acc = np.zeros(d) if bias is None else _f64(bias).copy()
            for i in range(w):
                acc += weight[:, i] * x_at(bi, ti - (w - 1) + i)
            y[bi, ti] = acc
    if activation in ("silu", "swish"):
        y = y / (1 + np.exp(-y))
    state = np.zeros((b, w - 1, d))
    for bi in range(b):
        for j, pos in enumerate(range(t - (w - 1), t)):
            state[bi, j] = x_at(bi, pos)
    return y, state


def conv_lax_formula(x, weight, bias, initial_state):
    """The same conv with SiLU through lax's grouped convolution (cross-correlation), float32,
    differentiable: the gradients' reference."""
    d = x.shape[2]
    xp = jnp.concatenate([initial_state, x], axis=1)
    y = jax.lax.conv_general_dilated(
        jnp.swapaxes(xp, 1, 2), weight[:, None, :], (1,), "VALID", feature_group_count=d, precision="highest"
    )
    return jax.nn.silu(jnp.swapaxes(y, 1, 2) + bias)


# ------------------------------------------------------------------------ grouped experts


def grouped_experts_reference(x, w_gate, w_up, w_down, sizes) -> np.ndarray:
    """float64 SwiGLU of each expert on its own run of rows; rows past the groups are zero."""
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    out = np.zeros_like(x)
    start = 0
    for g, size in enumerate(np.asarray(sizes)):
        rows = x[start : start + size]
        h = rows @ w_gate[g]
        out[start : start + size] = (h / (1 + np.exp(-h)) * (rows @ w_up[g])) @ w_down[g]
        start += size
    return out


def _check_grouped_experts_form(impl: str, transform) -> None:
    """Four groups of 3, 0, 5 and 2 rows, and 2 rows of padding."""
    rng = np.random.default_rng(4)
    sizes = np.array([3, 0, 5, 2], np.int32)
    x = rng.normal(size=(12, 6)).astype(np.float32)
    w_gate, w_up = (rng.normal(size=(4, 6, 5)).astype(np.float32) for _ in range(2))
    w_down = rng.normal(size=(4, 5, 6)).astype(np.float32)
    got = transform(functools.partial(grouped_experts, impl=impl))(x, w_gate, w_up, w_down, sizes)
    assert_close(got, grouped_experts_reference(x, w_gate, w_up, w_down, sizes), F32_OUT, f"grouped_experts {impl}")


# ------------------------------------------------------------------------ every form of every op

# Every op's FormTable; recurrences sharing a table list it once.
FORM_TABLES = (
    LINEAR_ATTN_FORMS, SIMPLE_GLA_FORMS, GLA_FORMS, DELTA_RULE_FORMS, GATED_DELTA_RULE_FORMS, KDA_FORMS,
    ATTENTION_FORMS, CACHED_ATTENTION_FORMS, GROUPED_EXPERT_FORMS,
)
# The other tables: op -> (check(form, transform), whether it also compares gradients).
_TABLE_CHECKS = {
    ATTENTION_FORMS.op: (_check_attention_form, True),
    CACHED_ATTENTION_FORMS.op: (_check_cached_attention_form, False),
    GROUPED_EXPERT_FORMS.op: (_check_grouped_experts_form, False),
}


def every_form(tiny: bool = False) -> list[tuple[str, Callable]]:
    """(id, check) for every registered form of every table in FORM_TABLES; check(transform) runs
    the form through transform (jax.jit, or chex's variant). A recurrence's forms are checked
    against its recurrent form (RECURRENCE_CASES, CHUNK_SIZES; with tiny=True the TINY_CASES on
    outputs and final states), the others' against their float64 references. A form added to a
    table is in this list."""
    checks = list(_recurrence_checks(TINY_CASES, False) if tiny else _recurrence_checks(RECURRENCE_CASES, True))
    for table in FORM_TABLES:
        if table.op in _TABLE_CHECKS:
            check, has_gradients = _TABLE_CHECKS[table.op]
            kwargs = {"gradients": not tiny} if has_gradients else {}
            checks += [(f"{table.op}-{form}", functools.partial(check, form, **kwargs)) for form in table.names]
    return checks
