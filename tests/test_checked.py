"""ops.checked: the value checks the ops run outside jit (g <= 0, finite beta) also stop a jitted
call, and an unchecked call of the same jitted function is not slowed or changed by them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ops
from numerics import F32_OUT, assert_close

Q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 2, 4)), jnp.float32)
GOOD_G, BAD_G = -jnp.ones((1, 5, 2)), jnp.full((1, 5, 2), 0.5)
BETA = jnp.full((1, 5, 2), 0.5)


@jax.jit
def gated(g, beta):
    return ops.gated_delta_rule(Q, Q, Q, g, beta)[0]


def test_a_positive_gate_under_jit_is_refused_in_checked_mode():
    with pytest.raises(ValueError, match=r"^g must be a natural-log decay <= 0 \(no NaN\), got a maximum of 0.5$"):
        ops.checked(gated)(BAD_G, BETA)
    with pytest.raises(ValueError, match="^beta must be finite$"):
        ops.checked(gated)(GOOD_G, BETA.at[0, 2, 1].set(jnp.inf))
    # Good values pass and give the unchecked result.
    assert_close(ops.checked(gated)(GOOD_G, BETA), gated(GOOD_G, BETA), F32_OUT, "checked")


def test_jit_inside_the_checked_function_is_checked_too():
    run = ops.checked(lambda g: jax.jit(lambda g: ops.simple_gla(Q, Q, Q, g)[0])(g))
    with pytest.raises(ValueError, match="g must be a natural-log decay"):
        run(BAD_G)


def test_unchecked_calls_keep_their_own_trace():
    """The checked trace is a separate jit cache entry: a plain call afterwards carries no check and
    computes what the recurrent form computes for the same (bad) gate."""
    ops.checked(gated)(GOOD_G, BETA)
    recurrent = jax.jit(lambda g, beta: ops.gated_delta_rule(Q, Q, Q, g, beta, impl="recurrent")[0])
    assert_close(gated(BAD_G, BETA), recurrent(BAD_G, BETA), F32_OUT, "unchecked")
