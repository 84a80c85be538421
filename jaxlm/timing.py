"""Wall-clock timing of compiled JAX functions, shared by the demo and the benchmarks."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax


def best_seconds(fn: Callable, *args: Any, repeats: int = 3) -> float:
    """The fastest of ``repeats`` calls of fn(*args), after one call that compiles and warms up."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best
