"""The chunk form's backward recomputes states: its compiled forward+backward needs far less
temporary memory than storing every step's K×V state would."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxlm import ops

T, H, K, V = 16384, 4, 64, 64
EVERY_STEP_STATE_BYTES = T * H * K * V * 4
# A quarter of all states, and one [T, H, V] float32 buffer: the output cotangent that the
# non-finite isolation's select (ops.nonfinite.Poison) hands the form's backward, 16 MiB here.
BOUND = EVERY_STEP_STATE_BYTES // 4 + T * H * V * 4

_spec = jax.ShapeDtypeStruct
CASES = {
    "simple_gla": (lambda q, k, v, g, beta: ops.simple_gla(q, k, v, g, impl="chunk")[0], (1, T, H)),
    "gla": (lambda q, k, v, g, beta: ops.gla(q, k, v, g, impl="chunk")[0], (1, T, H, K)),
    "gated_delta_rule": (
        lambda q, k, v, g, beta: ops.gated_delta_rule(q, k, v, g, beta, impl="chunk")[0],
        (1, T, H),
    ),
}


@pytest.mark.parametrize("op", list(CASES))
def test_chunk_forward_backward_temp_memory_near_a_quarter_of_all_states(op):
    fn, gate_shape = CASES[op]
    loss = lambda *args: jnp.sum(fn(*args))  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    qk = _spec((1, T, H, K), jnp.float32)
    compiled = grad.lower(
        qk, qk, _spec((1, T, H, V), jnp.float32), _spec(gate_shape, jnp.float32), _spec((1, T, H), jnp.float32)
    ).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < BOUND, f"{op}: {temp / 2**20:.0f} MiB temporary, bound {BOUND / 2**20:.0f} MiB"
