"""Chunkwise execution of a linear recurrence, with a backward pass that recomputes states.

A chunked recurrence is three pure functions of one chunk:
  prepare(x_i) -> aux_i            work that needs no state (decays, WY factors); parallel.
  advance(aux_i, S_i) -> S_{i+1}   the cheap inter-chunk state pass; sequential.
  readout(x_i, aux_i, S_i) -> o_i  the chunk's outputs from its inputs and start state; parallel.

``run_chunked`` runs them forward. Its custom VJP saves only the inputs; the backward pass
recomputes the per-chunk start states (memory N·K·V, not T·K·V), walks back over the chunks
with a reverse scan that takes each chunk's readout and advance VJPs (carrying the state
cotangent), and finishes with the prepare VJP, which recomputes each chunk's intermediates.

The parallel stages run ``CHUNKS_PER_STEP`` chunks at a time (``lax.map`` with a batch size), so
the quadratic intra-chunk intermediates (C² per chunk, C²·K for a vector gate) exist for one
group of chunks at once rather than for the whole sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

Prepare = Callable[[Any], Any]
Advance = Callable[[Any, jax.Array], jax.Array]
Readout = Callable[[Any, Any, jax.Array], jax.Array]

CHUNKS_PER_STEP = 4


def _map_chunks(f: Callable, *args: Any) -> Any:
    """f applied to every chunk of args (leading axis N), a group of chunks at a time."""
    return jax.lax.map(lambda a: f(*a), args, batch_size=CHUNKS_PER_STEP)


def _states(advance: Advance, aux: Any, s0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Start state of every chunk [N, ...] and the final state."""

    def step(s, aux_i):
        return advance(aux_i, s), s

    final, starts = jax.lax.scan(step, s0, aux)
    return starts, final


def _forward(prepare: Prepare, advance: Advance, readout: Readout, xs: Any, s0: jax.Array):
    aux = _map_chunks(prepare, xs)
    starts, final = _states(advance, aux, s0)
    return _map_chunks(readout, xs, aux, starts), final


@functools.cache
def _chunked_with_vjp(prepare: Prepare, advance: Advance, readout: Readout):
    @jax.custom_vjp
    def run(xs, s0):
        return _forward(prepare, advance, readout, xs, s0)

    def fwd(xs, s0):
        return _forward(prepare, advance, readout, xs, s0), (xs, s0)

    def bwd(residuals, cotangents):
        xs, s0 = residuals
        d_out, d_final = cotangents
        aux = _map_chunks(prepare, xs)
        starts, _ = _states(advance, aux, s0)

        def back(ds_next, inputs):
            # One chunk's readout and advance VJPs together, so their cotangents for aux are
            # summed here rather than stored twice for the whole sequence.
            x_i, aux_i, s_i, d_out_i = inputs
            dx_i, daux_read_i, ds_read_i = jax.vjp(readout, x_i, aux_i, s_i)[1](d_out_i)
            daux_advance_i, ds_advance_i = jax.vjp(advance, aux_i, s_i)[1](ds_next)
            daux_i = jax.tree.map(lambda a, b: a + b, daux_read_i, daux_advance_i)
            return ds_read_i + ds_advance_i, (dx_i, daux_i)

        ds0, (dxs_read, daux) = jax.lax.scan(back, d_final, (xs, aux, starts, d_out), reverse=True)

        def prepare_vjp(x_i, daux_i, dx_read_i):
            # Summed per group, so the prepare cotangents never exist for the whole sequence.
            (dx_i,) = jax.vjp(prepare, x_i)[1](daux_i)
            return jax.tree.map(lambda a, b: a + b, dx_i, dx_read_i)

        return _map_chunks(prepare_vjp, xs, daux, dxs_read), ds0

    run.defvjp(fwd, bwd)
    return run


def run_chunked(prepare: Prepare, advance: Advance, readout: Readout, xs: Any, s0: jax.Array):
    """Runs a chunked recurrence.

    Args:
      prepare, advance, readout: module-level pure functions of one chunk (see module doc).
      xs: pytree of float arrays with a leading chunk axis [N, ...].
      s0: the start state, float32.
    Returns:
      (outputs stacked over chunks [N, ...], final state).
    """
    return _chunked_with_vjp(prepare, advance, readout)(xs, s0)
