"""Chunkwise execution of a linear recurrence, with a backward pass that recomputes states.

A chunked recurrence is three pure functions of one chunk:
  prepare(x_i) -> aux_i            work that needs no state (decays, WY factors); parallel.
  advance(aux_i, S_i) -> S_{i+1}   the cheap inter-chunk state pass; sequential.
  readout(x_i, aux_i, S_i) -> o_i  the chunk's outputs from its inputs and start state; parallel.

``run_chunked`` runs them forward. Its custom VJP saves only the inputs; the backward pass
recomputes the per-chunk start states (memory N·K·V, not T·K·V), takes the readout's VJP for all
chunks in parallel, walks the state cotangent back through ``advance`` with a reverse scan, and
finishes with the prepare VJP, again in parallel.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

Prepare = Callable[[Any], Any]
Advance = Callable[[Any, jax.Array], jax.Array]
Readout = Callable[[Any, Any, jax.Array], jax.Array]


def _states(advance: Advance, aux: Any, s0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Start state of every chunk [N, ...] and the final state."""

    def step(s, aux_i):
        return advance(aux_i, s), s

    final, starts = jax.lax.scan(step, s0, aux)
    return starts, final


def _forward(prepare: Prepare, advance: Advance, readout: Readout, xs: Any, s0: jax.Array):
    aux = jax.vmap(prepare)(xs)
    starts, final = _states(advance, aux, s0)
    return jax.vmap(readout)(xs, aux, starts), final


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
        aux, prepare_vjp = jax.vjp(jax.vmap(prepare), xs)
        starts, _ = _states(advance, aux, s0)
        _, readout_vjp = jax.vjp(jax.vmap(readout), xs, aux, starts)
        dxs_read, daux_read, dstarts_read = readout_vjp(d_out)

        def back(ds_next, inputs):
            aux_i, s_i, ds_read_i = inputs
            _, advance_vjp = jax.vjp(advance, aux_i, s_i)
            daux_i, ds_i = advance_vjp(ds_next)
            return ds_i + ds_read_i, daux_i

        ds0, daux_advance = jax.lax.scan(back, d_final, (aux, starts, dstarts_read), reverse=True)
        daux = jax.tree.map(lambda a, b: a + b, daux_read, daux_advance)
        (dxs_prepare,) = prepare_vjp(daux)
        dxs = jax.tree.map(lambda a, b: a + b, dxs_read, dxs_prepare)
        return dxs, ds0

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
