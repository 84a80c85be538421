"""Argument checks shared by every op.

Each check raises ``ValueError`` naming the argument and what was expected, so a wrong call
fails loudly instead of broadcasting into a silent wrong answer. Value checks (such as g <= 0)
run on concrete arrays; under ``jax.jit`` the values are unknown and only shapes are checked,
unless the call is traced by ``ops.checked`` (checked.py), which compiles the value checks in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.ops.checked import check_value


def is_concrete(x: Any) -> bool:
    """True when the values of x are known now (not a tracer inside jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_rank(name: str, x: Any, rank: int, letters: str | Sequence[str]) -> tuple[int, ...]:
    shape = _shape(x)
    if len(shape) != rank:
        raise ValueError(f"{name} must have shape [{', '.join(letters)}] (rank {rank}), got shape {shape}")
    return shape


def check_float(name: str, x: Any) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def check_shape(name: str, x: Any, expected: Sequence[int], letters: str) -> None:
    shape = _shape(x)
    if shape != tuple(expected):
        dims = ", ".join(f"{l}={d}" for l, d in zip(letters.split(","), expected))
        raise ValueError(f"{name} must have shape [{dims}], got shape {shape}")


def check_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int, int]:
    """Checks q, k: [B, T, H, K] and v: [B, T, HV, V] with HV a multiple of H.

    Returns (B, T, H, K, HV, V).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4, "BTHK" if name != "v" else ("B", "T", "HV", "V"))
        check_float(name, x)
    b, t, h, dk = _shape(q)
    if _shape(k) != (b, t, h, dk):
        raise ValueError(f"k must have the same shape as q [B={b}, T={t}, H={h}, K={dk}], got {_shape(k)}")
    vb, vt, hv, dv = _shape(v)
    if (vb, vt) != (b, t):
        raise ValueError(f"v must have shape [B={b}, T={t}, HV, V] to match q, got {_shape(v)}")
    if t == 0 or dk == 0 or dv == 0 or h == 0 or b == 0:
        raise ValueError(f"q, k and v must have non-empty B, T, H, K and V, got q {_shape(q)} and v {_shape(v)}")
    if hv % h != 0:
        raise ValueError(f"v's head count HV={hv} must be a multiple of q/k's head count H={h}")
    return b, t, h, dk, hv, dv


def check_log_gate(name: str, g: Any, expected: Sequence[int], letters: str) -> None:
    """A natural-log decay: the expected shape, floating point, and g <= 0 when concrete."""
    check_float(name, g)
    check_shape(name, g, expected, letters)
    if is_concrete(g):
        values = np.asarray(jnp.asarray(g, jnp.float32))
        if np.isnan(values).any():
            raise ValueError(f"{name} contains NaN; gates must be log decays <= 0")
        if (values > 0).any():
            raise ValueError(f"{name} must be a natural-log decay <= 0, got a maximum of {values.max():g}")
    else:
        check_value(g <= 0, f"{name} must be a natural-log decay <= 0 (no NaN), got a maximum of {{}}", jnp.max(g))


def check_beta(beta: Any, expected: Sequence[int]) -> None:
    check_float("beta", beta)
    check_shape("beta", beta, expected, "B,T,HV")
    if is_concrete(beta):
        values = np.asarray(jnp.asarray(beta, jnp.float32))
        if not np.isfinite(values).all():
            raise ValueError("beta must be finite")
    else:
        check_value(jnp.isfinite(beta), "beta must be finite")


def check_initial_state(initial_state: Any, expected: Sequence[int]) -> None:
    if initial_state is None:
        return
    check_float("initial_state", initial_state)
    check_shape("initial_state", initial_state, expected, "B,HV,K,V")


def check_segment_ids(segment_ids: Any, batch: int, length: int) -> None:
    if segment_ids is None:
        return
    if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
        raise ValueError(f"segment_ids must be an integer array, got dtype {jnp.result_type(segment_ids)}")
    check_shape("segment_ids", segment_ids, (batch, length), "B,T")


def check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size!r}")
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size}")


def check_scale(scale: Any) -> None:
    if scale is None:
        return
    if not isinstance(scale, (int, float, np.floating, np.integer)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
