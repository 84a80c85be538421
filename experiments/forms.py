"""The linear ops' execution forms side by side at notebook sizes: how far each form is from the
token-by-token reference, and forward time against T beside softmax attention.

Notebooks import this file from the checkout (``from experiments import forms``, with the
repository root on sys.path). It reuses bench_ops's inputs (B=1, H=4, K=V=64, float32) and its
jitted forward passes, and jaxlm.timing's best-of-n clock; bench_ops.py itself is the full
benchmark (every op and form, forward and backward, T up to 16K).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # imported as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from experiments import bench_ops, reporting
from jaxlm import ops
from jaxlm.timing import best_seconds

# The recurrences the lecture compares, each with the ops-API name and the model family it is.
NAMED_OPS = {
    "linear_attn": "linear attention",
    "simple_gla": "Mamba-2 / SSD (scalar gate)",
    "gla": "GLA (per-channel gate)",
    "gated_delta_rule": "Gated DeltaNet (gated delta rule)",
}
FORMS = ("recurrent", "associative", "chunk")

# op name -> f(inputs, impl) -> (o, final state), on bench_ops.make_inputs's arrays.
_CALLS = {
    "linear_attn": lambda x, impl: ops.linear_attn(x["q"], x["k"], x["v"], impl=impl, output_final_state=True),
    "simple_gla": lambda x, impl: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], impl=impl, output_final_state=True),
    "gla": lambda x, impl: ops.gla(x["q"], x["k"], x["v"], x["gk"], impl=impl, output_final_state=True),
    "gated_delta_rule": lambda x, impl: ops.gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], impl=impl, output_final_state=True),
}


def relative_rms(a, b) -> float:
    """The numerics contract's error of ``a`` against the reference ``b``: rms(a − b) / (rms(b) + 1e-8)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {a.shape} and {b.shape}")
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-8))


def _check_op(op: str) -> None:
    if op not in _CALLS:
        raise ValueError(f"op must be one of {list(_CALLS)}, got {op!r}")


def _check_lengths(seq_lens: Sequence[int]) -> None:
    if not seq_lens or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in seq_lens):
        raise ValueError(f"seq_lens must be a non-empty sequence of positive ints, got {seq_lens!r}")


def agreement(op: str, t: int, forms: Sequence[str] = ("associative", "chunk")) -> dict[str, dict[str, float]]:
    """{form: {"o_max_abs", "o_rel_rms", "state_rel_rms"}}: each of ``forms`` against the recurrent
    form, for ``op`` on bench_ops's inputs of length ``t``, with matmuls at full float32 precision
    (a TPU's default would round their inputs to bfloat16)."""
    _check_op(op)
    _check_lengths([t])
    x = bench_ops.make_inputs(t)
    with jax.default_matmul_precision("float32"):
        results = {form: jax.jit(lambda x, form=form: _CALLS[op](x, form))(x) for form in ("recurrent", *forms)}
    ref_o, ref_s = results["recurrent"]
    return {form: dict(o_max_abs=float(np.max(np.abs(np.asarray(o) - np.asarray(ref_o)))),
                       o_rel_rms=relative_rms(o, ref_o), state_rel_rms=relative_rms(s, ref_s))
            for form, (o, s) in results.items() if form in forms}


# Curve name -> (bench_ops op, impl): softmax attention through the library's default dispatch
# (the flash kernel on GPU and TPU, XLA's query-blocked form on CPU) and linear attention's chunk form.
TIMED = {"softmax attention": ("attention", None), "linear attention (chunk)": ("linear_attn", "chunk")}


def time_against_length(seq_lens: Sequence[int], repeats: int = 3) -> list[dict]:
    """Forward time of each curve of TIMED at each T, measured side by side in this process:
    rows {"curve", "T", "seconds"} (the best of ``repeats`` after a compiling call)."""
    _check_lengths(seq_lens)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    rows = []
    for curve, (op, impl) in TIMED.items():
        forward, _ = bench_ops.build(op, impl)
        for t in seq_lens:
            rows.append(dict(curve=curve, T=t, seconds=best_seconds(forward, bench_ops.make_inputs(t), repeats=repeats)))
    return rows


def exponents(rows: list[dict]) -> dict[str, float]:
    """{curve: the log-log slope of time against T}, over all the rows' lengths (2 is N², 1 is N)."""
    out = {}
    for curve in dict.fromkeys(r["curve"] for r in rows):
        pts = sorted((r["T"], r["seconds"]) for r in rows if r["curve"] == curve)
        out[curve] = float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]) \
            if len(pts) > 1 else float("nan")
    return out


def plot_times(rows: list[dict], path: pathlib.Path | None = None):
    """Time against T, log-log, one line per curve with its fitted slope; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    slopes = exponents(rows)
    for curve, color in zip(slopes, ("tab:red", "tab:blue")):
        pts = sorted((r["T"], r["seconds"]) for r in rows if r["curve"] == curve)
        ax.loglog(*zip(*pts), "o-", color=color, label=f"{curve}: slope {slopes[curve]:.2f}")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward seconds (best of n)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    device = jax.devices()[0].device_kind
    return reporting.finish(fig, f"causal forward, B={bench_ops.B} H={bench_ops.H} D={bench_ops.D} float32, {device}",
                            path)
