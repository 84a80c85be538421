"""The numerics contract of docs/architecture.md as test assertions."""

from __future__ import annotations

import jax
import numpy as np

# Tolerances on relative RMS error, by what is compared.
F32_OUT = 1e-5  # float32 outputs and final states, form against form
F32_GRAD = 1e-4  # float32 gradients
BF16_OUT = 5e-3  # bf16 inputs, outputs against the float32 reference
BF16_GRAD = 8e-3  # dq, dk, dv, d initial_state
BF16_GATE_GRAD = 2e-2  # dbeta, dg
ABS_PASS = 1e-6  # a comparison passes outright when max |a - b| is below this


def rel_rms(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-8))


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    """Relative RMS error <= tol, or max abs error <= ABS_PASS. Works on pytrees."""
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e, f"{what}: structures differ: {tree_a} vs {tree_e}"
    for i, (a, e) in enumerate(zip(leaves_a, leaves_e)):
        a = np.asarray(a, np.float64)
        e = np.asarray(e, np.float64)
        assert a.shape == e.shape, f"{what}[{i}]: shape {a.shape} != {e.shape}"
        assert np.isfinite(a).all(), f"{what}[{i}]: non-finite values"
        if a.size == 0 or np.max(np.abs(a - e)) <= ABS_PASS:
            continue
        err = rel_rms(a, e)
        assert err <= tol, f"{what}[{i}]: relative RMS error {err:.3g} > {tol:g}"
