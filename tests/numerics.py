"""The numerics contract of docs/architecture.md as test assertions."""

from __future__ import annotations

import chex
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
    """The contract's comparison of two pytrees, leaf by leaf.

    chex checks that the structures and shapes match and that ``actual`` is finite. A leaf then
    passes outright when max |a − b| <= ABS_PASS (``chex.assert_trees_all_close`` with rtol=0),
    and otherwise needs a relative RMS error ``rms(a − b) / (rms(b) + 1e-8)`` <= tol: chex's own
    elementwise rtol is not the contract's metric. Dtypes may differ (a bf16 output against a
    float64 reference); both sides are compared in float64. The message names the failing leaf.
    """
    actual, expected = (jax.tree.map(lambda x: np.asarray(x, np.float64), tree) for tree in (actual, expected))
    try:
        chex.assert_trees_all_equal_structs(actual, expected)
        chex.assert_trees_all_equal_shapes(actual, expected)
        chex.assert_tree_all_finite(actual)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from None
    leaves, _ = jax.tree_util.tree_flatten_with_path(actual)
    for (path, a), e in zip(leaves, jax.tree.leaves(expected)):
        leaf = f"{what}{jax.tree_util.keystr(path)}"
        if a.size == 0:
            continue
        try:
            chex.assert_trees_all_close(a, e, rtol=0.0, atol=ABS_PASS)
            continue
        except AssertionError:
            pass
        err = rel_rms(a, e)
        assert err <= tol, f"{leaf}: relative RMS error {err:.3g} > {tol:g} (max |a - b| {np.max(np.abs(a - e)):.3g})"
