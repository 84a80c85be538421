"""The Pallas kernels of the linear recurrences beside their chunk form, at notebook sizes: how far
``impl="pallas"`` is from ``impl="chunk"`` (outputs, final states, gradients), forward time
against T for both, and how the kernel is laid out (read from its pallas_call, see
kernels_pallas.call_layout).

Notebooks import this file from the checkout (``from experiments import pallas_kernels``). Inputs
are bench_ops.make_inputs's (B=1, H=4, K=V=64, float32). Where the kernels run is the kernels'
own choice (kernels_pallas.settings.resolve_target): compiled on GPU (Triton) and TPU (Mosaic),
the Pallas HLO interpreter on CPU, which checks correctness and says nothing about speed.
experiments/gpu_kernels.py is the full GPU check and benchmark.
"""

from __future__ import annotations

import functools
import pathlib
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # imported as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_ops, reporting
from experiments.forms import relative_rms
from jaxlm import ops
from jaxlm.timing import best_seconds
from kernels_pallas import kernel_settings
from kernels_pallas.call_layout import KernelLayout, kernel_layouts
from kernels_pallas.settings import resolve_target

# The recurrences with a kernel, each with the model family it is and its kernel's name.
NAMED_OPS = {
    "simple_gla": "Mamba-2 / SSD (scalar gate)",
    "gla": "GLA (per-channel gate)",
    "gated_delta_rule": "Gated DeltaNet (gated delta rule)",
}
KERNELS = {"simple_gla": "simple_gla", "gla": "gla", "gated_delta_rule": "delta"}
# The numerics contract, float32 forms of one op: outputs and states, gradients; a comparison
# also passes outright when max |a - b| <= ABS_PASS.
F32_OUT, F32_GRAD, ABS_PASS = 1e-5, 1e-4, 1e-6
# bf16 inputs through the kernel against the float32 recurrent reference: outputs.
BF16_OUT = 5e-3
# What the forward kernel's pallas_call takes and gives, in order (the kernels' api.py):
# b is the chunk-local cumsum of the log gates, n the count of document starts so far in the chunk.
FORWARD_OPERANDS = {
    "simple_gla": (("q", "k", "b", "n", "v", "s0"), ("o", "final state")),
    "gla": (("q", "k", "b", "n", "v", "s0"), ("o", "final state")),
    "gated_delta_rule": (("q", "k", "b", "beta", "n", "v", "s0"), ("o", "final state")),
}
GRID_AXES = ("head", "value block", "chunk")

_CALLS = {
    "simple_gla": lambda x, **kw: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], **kw),
    "gla": lambda x, **kw: ops.gla(x["q"], x["k"], x["v"], x["gk"], **kw),
    "gated_delta_rule": lambda x, **kw: ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw),
}
# The inputs each op is differentiated in (bench_ops.OPS's).
DIFF = {op: bench_ops.OPS[op][1] for op in _CALLS}


def _check_op(op: str) -> None:
    if op not in _CALLS:
        raise ValueError(f"op must be one of {list(_CALLS)}, got {op!r}")


def _check_length(name: str, t) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"{name} must be a positive int, got {t!r}")


def mode() -> str:
    """How the kernels run here: "compiled" (GPU, TPU) or "interpreted" (CPU: the HLO interpreter)."""
    return "interpreted" if resolve_target().interpret is not False else "compiled"


@functools.lru_cache(maxsize=None)
def _forward(op: str, impl: str):
    """jit of x -> (o, final state); one per (op, impl), so that repeated lengths reuse a compile."""
    return jax.jit(lambda x: _CALLS[op](x, impl=impl, output_final_state=True))


@functools.lru_cache(maxsize=None)
def _gradients(op: str, impl: str):
    """jit of x -> the gradient of sum(o · w) in each of DIFF[op], w a fixed random cotangent."""
    def loss(d, rest, w):
        o, _ = _CALLS[op]({**rest, **d}, impl=impl)
        return jnp.sum(o * w)

    def grads(x, w):
        d = {n: x[n] for n in DIFF[op]}
        return jax.grad(loss)(d, {n: a for n, a in x.items() if n not in d}, w)

    return jax.jit(grads)


def _passes(a, b, tol: float) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.isfinite(a).all()) and (relative_rms(a, b) <= tol or float(np.max(np.abs(a - b))) <= ABS_PASS)


def agreement(op: str, t: int, gradients: bool = False) -> dict[str, dict]:
    """impl="pallas" against impl="chunk" for ``op`` on bench_ops's inputs of length ``t``, with
    matmuls at full float32 precision (a TPU's default would round the chunk form's inputs to
    bfloat16): {what: {"rel_rms", "max_abs", "tol", "ok"}} for "o", "final state" and, with
    ``gradients``, "d<name>" for each differentiated input."""
    _check_op(op)
    _check_length("t", t)
    x = bench_ops.make_inputs(t)
    with jax.default_matmul_precision("float32"):
        results = {impl: dict(zip(("o", "final state"), _forward(op, impl)(x))) for impl in ("pallas", "chunk")}
        if gradients:
            w = jax.random.normal(jax.random.PRNGKey(1), x["v"].shape)
            for impl in results:
                results[impl].update({f"d{n}": g for n, g in _gradients(op, impl)(x, w).items()})
    out = {}
    for what, ref in results["chunk"].items():
        got, tol = results["pallas"][what], F32_OUT if what in ("o", "final state") else F32_GRAD
        out[what] = dict(rel_rms=relative_rms(got, ref), max_abs=float(np.max(np.abs(np.asarray(got) - np.asarray(ref)))),
                         tol=tol, ok=_passes(got, ref, tol))
    return out


def bf16_agreement(op: str, t: int) -> dict:
    """bf16 inputs through impl="pallas" against the float32 recurrent reference (the contract's
    bf16 kernel check): {"rel_rms", "tol", "ok"} on the outputs."""
    _check_op(op)
    _check_length("t", t)
    x = bench_ops.make_inputs(t)
    with jax.default_matmul_precision("float32"):
        ref, _ = _forward(op, "recurrent")(x)
        o, _ = _forward(op, "pallas")(jax.tree.map(lambda a: a.astype(jnp.bfloat16), x))
    if o.dtype != jnp.bfloat16:
        raise AssertionError(f"o must come back in v's dtype bfloat16, got {o.dtype}")
    return dict(rel_rms=relative_rms(o, ref), tol=BF16_OUT, ok=_passes(o, ref, BF16_OUT))


def time_against_length(op: str, seq_lens: Sequence[int], repeats: int = 3,
                        impls: Sequence[str] = ("pallas", "chunk")) -> list[dict]:
    """Forward time of ``op`` for each of ``impls`` at each T, side by side in this process, at
    float32 matmul precision for both: rows {"impl", "T", "seconds"} (best of ``repeats`` after a
    compiling call). On CPU the kernel is interpreted: its times measure the interpreter."""
    _check_op(op)
    if not seq_lens:
        raise ValueError("seq_lens must hold at least one length")
    for t in seq_lens:
        _check_length("each of seq_lens", t)
    _check_length("repeats", repeats)
    rows = []
    with jax.default_matmul_precision("float32"):
        for impl in impls:
            for t in seq_lens:
                rows.append(dict(impl=impl, T=t, seconds=best_seconds(_forward(op, impl), bench_ops.make_inputs(t),
                                                                      repeats=repeats)))
    return rows


def speedups(rows: list[dict], over: str = "chunk", of: str = "pallas") -> dict[int, float]:
    """{T: time of ``over`` / time of ``of``}: above 1 where ``of`` is faster."""
    by = {(r["impl"], r["T"]): r["seconds"] for r in rows}
    return {t: by[(over, t)] / by[(of, t)] for (impl, t) in by if impl == of and (over, t) in by}


def plot_times(rows: list[dict], op: str, path: pathlib.Path | None = None):
    """Forward time against T, log-log, one line per impl; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for impl, color in zip(dict.fromkeys(r["impl"] for r in rows), ("tab:purple", "tab:blue", "tab:gray")):
        pts = sorted((r["T"], r["seconds"]) for r in rows if r["impl"] == impl)
        label = f'impl="{impl}"' + (" (interpreted)" if impl == "pallas" and mode() == "interpreted" else "")
        ax.loglog(*zip(*pts), "o-", color=color, label=label)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward seconds (best of n)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    device = jax.devices()[0].device_kind
    return reporting.finish(fig, f"{op} forward, B={bench_ops.B} H={bench_ops.H} K=V={bench_ops.D} float32, {device}",
                            path)


def layouts(op: str, t: int, driver: str | None = None, chunk_size: int | None = None) -> list[KernelLayout]:
    """The pallas_calls of ``op``'s value and gradient at length ``t`` (forward, the backward's
    states-only forward, backward), traced, not run, with the kernels' ``driver`` ("loop", "grid";
    None: this platform's default) and ``chunk_size`` (None: the op's default)."""
    _check_op(op)
    _check_length("t", t)
    x = bench_ops.make_inputs(t)
    kw = {} if chunk_size is None else dict(chunk_size=chunk_size)

    def value_and_grad(q):
        return jax.value_and_grad(lambda q: jnp.sum(_CALLS[op]({**x, "q": q}, impl="pallas", **kw)[0]))(q)

    with kernel_settings(driver=driver):
        return kernel_layouts(value_and_grad, x["q"])


def describe_forward(op: str, layout: KernelLayout) -> str:
    """``layout.describe`` of the forward kernel of ``op``, with its axes and operands named."""
    _check_op(op)
    ins, outs = FORWARD_OPERANDS[op]
    return layout.describe(GRID_AXES, ins, outs)


def _chunk_walk(layout: KernelLayout) -> tuple[int, int, int, tuple[int, ...], str]:
    """(T, rows per step, steps, state shape, where the state lives) of a recurrence kernel's
    layout: the "grid" driver steps over its grid's last axis and keeps the state in scratch; the
    "loop" driver loops inside the kernel, carrying it."""
    t = layout.inputs[0].array_shape[1]
    if layout.scratch:
        (state, _, space), steps = layout.scratch[0], layout.grid[-1]
        return t, layout.inputs[0].block[1], steps, state, f"{space} scratch"
    if layout.loops:
        loop = layout.loops[0]
        state = next(shape for shape, _ in loop.carry if len(shape) == 2)
        return t, t // loop.length, loop.length, state, "the loop's carry"
    raise ValueError(f"{layout.name}: neither a scratch state (grid driver) nor an in-kernel loop (loop driver)")


def plot_chunk_walk(layouts_by_driver: dict[str, KernelLayout], path: pathlib.Path | None = None):
    """One panel per driver: the sequence of one (head, value block) program cut into the chunks it
    steps through, the block each step reads, and the state handed from chunk to chunk, all read
    from the kernels' layouts (``{"grid": layout, "loop": layout}``); returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    fig, axes = plt.subplots(len(layouts_by_driver), 1, figsize=(9, 2.3 * len(layouts_by_driver)), squeeze=False)
    for ax, (driver, layout) in zip(axes[:, 0], layouts_by_driver.items()):
        t, rows, steps, state, where = _chunk_walk(layout)
        block = "[" + ", ".join("·" if d is None else str(d) for d in layout.inputs[0].block) + "]"
        for i in range(steps):
            ax.add_patch(Rectangle((i * rows, 0), rows, 1, facecolor="tab:blue" if i % 2 == 0 else "tab:cyan",
                                   alpha=0.35, edgecolor="black"))
            ax.text((i + 0.5) * rows, 0.5, f"chunk {i}\ntokens {i * rows}–{(i + 1) * rows - 1}", ha="center",
                    va="center", fontsize=8)
            if i + 1 < steps:
                ax.add_patch(FancyArrowPatch(((i + 0.75) * rows, 1.05), ((i + 1.25) * rows, 1.05),
                                             connectionstyle="arc3,rad=-0.5", arrowstyle="-|>", mutation_scale=10))
        ax.text(t / 2, 1.8, f"state S {list(state)} float32 passed chunk to chunk, in {where}", ha="center", fontsize=9)
        if driver == "grid" or layout.scratch:
            how = f"grid {layout.grid}: one program per chunk (last grid axis, sequential); q block {block}"
        else:
            how = f"grid {layout.grid}: one program per (head, value block), q block {block} = whole sequence"
        ax.set_title(f'driver "{driver}": {how}', fontsize=9)
        ax.set_xlim(0, t)
        ax.set_ylim(-0.1, 2.1)
        ax.set_yticks([])
        ax.set_xlabel("token")
    return reporting.finish(fig, f"{layout.name}: how one (head, value block) walks its {steps} chunks", path)
