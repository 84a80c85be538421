"""Non-finite inputs stay where they fall.

A NaN or Inf in one token must reach exactly the outputs that token causally reaches: the same
token's output for a bad query, and the rest of its document for a bad key, value, gate or write
strength (the state carries it). Masks applied by ``where`` inside a form keep a non-finite value
out of the forward pass, but not out of the backward one: the cotangent of a masked entry is zero,
and a matmul still multiplies that zero by the non-finite input (0·NaN = NaN), so the gradients of
earlier tokens and of other documents turn NaN. The ops therefore isolate non-finite values
before any form runs: each bad value is replaced by zero (``finite_or_zero``), the forms compute
on finite inputs only, and the outputs the bad values reach are set to NaN afterwards
(``Poison``). Every form and every kernel gets the same isolation, forward and backward; the
poisoned outputs are constants, so no gradient flows through them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.typing import Arr


def finite_or_zero(x: Arr) -> jax.Array:
    """x with every NaN and ±Inf replaced by 0."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def isolate(x: Arr, lead: int) -> tuple[jax.Array, jax.Array]:
    """(x with every NaN and ±Inf replaced by 0, [leading `lead` axes] bool: any non-finite value
    in the trailing axes). One isfinite serves both."""
    finite = jnp.isfinite(x)
    zeroed = jnp.where(finite, x, jnp.zeros((), x.dtype))
    if x.ndim == lead:
        return zeroed, ~finite
    return zeroed, ~finite.reshape(*x.shape[:lead], -1).all(axis=-1)


def any_trailing(flags: jax.Array, lead: int) -> jax.Array:
    """[leading `lead` axes] bool: any flag set in the trailing axes."""
    return flags.reshape(*flags.shape[:lead], -1).any(axis=-1) if flags.ndim > lead else flags


def bad_log_gate(g: Arr) -> jax.Array:
    """Gates are log decays in [-inf, 0]: -inf is an exact reset, NaN and +inf are not values."""
    return jnp.isnan(g) | (g == jnp.inf)


def reached_in_document(bad: jax.Array, reset: jax.Array, bad_start: jax.Array | None = None) -> jax.Array:
    """[B, T, ...] bool: a bad write at some s <= t of t's document (or, for the row's first
    document, a bad start state) has reached the state at t.

    bad: [B, T, ...] bool; reset: [B, T] bool, True where a document starts; bad_start: [B, ...]
    bool or None. A segmented running OR, as an associative scan over (reset, reached) pairs.
    """
    if bad_start is not None:
        bad = bad.at[:, 0].set(bad[:, 0] | bad_start)
    reset = jnp.broadcast_to(reset.reshape(*reset.shape, *([1] * (bad.ndim - 2))), bad.shape)

    def combine(earlier, later):
        reset_a, reached_a = earlier
        reset_b, reached_b = later
        return reset_a | reset_b, reached_b | (reached_a & ~reset_b)

    return jax.lax.associative_scan(combine, (reset, bad), axis=1)[1]


class Poison(NamedTuple):
    """Which outputs of a recurrence non-finite inputs reach."""

    output: jax.Array  # [B, T, HV] bool: o_t is NaN
    final_state: jax.Array  # [B, HV] bool: the final state is NaN

    def apply(self, o: jax.Array, s_final: jax.Array) -> tuple[jax.Array, jax.Array]:
        """o [B, T, HV, V] and s_final [B, HV, K, V] with the reached entries set to NaN."""
        o = jnp.where(self.output[..., None], jnp.nan, o)
        return o, jnp.where(self.final_state[..., None, None], jnp.nan, s_final)


def _running_max(values: jax.Array, reset: jax.Array) -> jax.Array:
    """The running max of ``values`` [B, T, ...] within each document: a segmented cummax that
    restarts where ``reset`` [B, T] marks a document start."""
    reset = jnp.broadcast_to(reset.reshape(*reset.shape, *([1] * (values.ndim - 2))), values.shape)

    def combine(earlier, later):
        reset_a, value_a = earlier
        reset_b, value_b = later
        return reset_a | reset_b, jnp.where(reset_b, value_b, jnp.maximum(value_a, value_b))

    return jax.lax.associative_scan(combine, (reset, values), axis=1)[1]


def attention_reach(
    bad_keys: jax.Array, length: int, *, causal: bool, window: int | None, documents: jax.Array | None
) -> jax.Array:
    """[B, T, Hk] bool: query t sees a key s with a non-finite key or value.

    bad_keys: [B, S, Hk] bool. The keys query t sees form one interval of positions, cut by
    causality, the window and t's document (documents: [B, T] running document numbers, S == T),
    so a prefix count of bad keys answers each query in O(1).
    """
    b, s_len, _ = bad_keys.shape
    t = jnp.arange(length)
    lo, hi = jnp.zeros((b, length), jnp.int32), jnp.full((b, length), s_len - 1, jnp.int32)
    if causal:
        hi = jnp.minimum(hi, t)
    if window is not None:
        lo = jnp.maximum(lo, t - window + 1)
        if not causal:
            hi = jnp.minimum(hi, t + window - 1)
    if documents is not None:
        is_start = jnp.concatenate([jnp.ones((b, 1), bool), documents[:, 1:] != documents[:, :-1]], axis=1)
        is_end = jnp.concatenate([documents[:, 1:] != documents[:, :-1], jnp.ones((b, 1), bool)], axis=1)
        lo = jnp.maximum(lo, jax.lax.cummax(jnp.where(is_start, t, 0), axis=1))
        hi = jnp.minimum(hi, jax.lax.cummin(jnp.where(is_end, t, length - 1), axis=1, reverse=True))
    counts = jnp.cumsum(bad_keys.astype(jnp.int32), axis=1)
    counts = jnp.concatenate([jnp.zeros_like(counts[:, :1]), counts], axis=1)  # [B, S+1, Hk]

    def at(index):
        return jnp.take_along_axis(counts, jnp.clip(index, 0, s_len)[:, :, None], axis=1)

    return (hi >= lo)[:, :, None] & (at(hi + 1) - at(lo) > 0)


def last_bad_position(
    bad: jax.Array, positions: jax.Array, reset: jax.Array, carried: jax.Array
) -> jax.Array:
    """[B, T, Hk] int32: the position of the latest non-finite key at or before each token in its
    document, −1 when there is none.

    bad: [B, T, Hk] bool; positions: [T] int32; reset: [B, T] bool document starts; carried:
    [B, Hk] int32, the latest bad position of the document the first token continues.
    """
    marks = jnp.where(bad, positions[None, :, None], -1)
    marks = marks.at[:, 0].set(jnp.maximum(marks[:, 0], carried))  # the first token never starts a document
    return _running_max(marks, reset)
