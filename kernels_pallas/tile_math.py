"""In-kernel math on 2-D values, written so that Triton, Mosaic and the interpreters all lower it:
no transposes of values, no dynamic slicing of values (masked sums instead), reductions one axis
at a time, matmuls through ``lax.dot_general`` with float32 accumulation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def row_ids(shape: tuple[int, int]) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, 0)


def col_ids(shape: tuple[int, int]) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, 1)


def masked_exp(x: jax.Array, keep: jax.Array) -> jax.Array:
    """exp(x) where keep, else 0; masked before exp too, so no inf - inf or overflow leaks."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, 0.0)), 0.0)


def take_row(x: jax.Array, i) -> jax.Array:
    """Row i of x [n, m] as [1, m] (a masked sum: no dynamic slicing of values)."""
    return jnp.sum(jnp.where(row_ids(x.shape) == i, x, 0.0), axis=0, keepdims=True)


def take_col(x: jax.Array, j) -> jax.Array:
    """Column j of x [n, m] as [n, 1]."""
    return jnp.sum(jnp.where(col_ids(x.shape) == j, x, 0.0), axis=1, keepdims=True)


def col_to_row(x: jax.Array) -> jax.Array:
    """[n, 1] -> [1, n] without a transpose."""
    n = x.shape[0]
    return jnp.sum(jnp.where(row_ids((n, n)) == col_ids((n, n)), x, 0.0), axis=0, keepdims=True)


def row_to_col(x: jax.Array) -> jax.Array:
    """[1, n] -> [n, 1] without a transpose."""
    n = x.shape[1]
    return jnp.sum(jnp.where(row_ids((n, n)) == col_ids((n, n)), x, 0.0), axis=1, keepdims=True)


def total(x: jax.Array) -> jax.Array:
    """Sum of a 2D value as [1, 1] (one axis at a time, as Triton reduces)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _dot(a: jax.Array, b: jax.Array, contract: tuple, precision: Any) -> jax.Array:
    return lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=F32)


def mm(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """a @ b."""
    return _dot(a, b, ((1,), (0,)), precision)


def mm_nt(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """a @ bᵀ."""
    return _dot(a, b, ((1,), (1,)), precision)


def mm_tn(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """aᵀ @ b."""
    return _dot(a, b, ((0,), (0,)), precision)


def last_row(value: jax.Array, rows: int) -> jax.Array:
    """[rows, m] zeros with ``value`` [1, m] in the last row."""
    return jnp.where(row_ids((rows, value.shape[1])) == rows - 1, value, 0.0)
