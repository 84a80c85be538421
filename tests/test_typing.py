"""The shape annotations of jaxlm/typing.py are checked under the tests (tests/conftest.py installs
jaxtyping's import hook with beartype): a mismatch between annotated arrays fails, in plain
functions and in NNX modules, eagerly and under jit; the public ops leave bad arguments to their
ValueErrors; and without the hook nothing is wrapped."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxtyping import TypeCheckError

from jaxlm import ops
from jaxlm.layers import GatedLinearAttention
from jaxlm.ops.gla.recurrent import diagonal_recurrent
from numerics import F32_OUT, assert_close


def recurrence_args(v_dim_of_state: int = 5):
    """diagonal_recurrent's arguments, B=1, T=3, HV=2, K=4, V=5; the state's V as given."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 3, 2, 4)).astype(np.float32)
    v = rng.normal(size=(1, 3, 2, 5)).astype(np.float32)
    g = -np.ones((1, 3, 2, 1), np.float32)
    return q, q, v, g, np.zeros((1, 3), bool), np.zeros((1, 2, 4, v_dim_of_state), np.float32)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_state_that_breaks_its_annotation_fails(jit):
    fn = jax.jit(diagonal_recurrent) if jit else diagonal_recurrent
    o, s = fn(*recurrence_args())
    q, k, v, g, _, _ = recurrence_args()
    o_ref = np.einsum("thk,thk->th", q[0], k[0])  # S_0 = 0, so o_0 = (q_0·k_0) v_0
    assert_close(o[0, 0], o_ref[0][:, None] * v[0, 0], F32_OUT, "o_0")
    with pytest.raises(TypeCheckError, match="parameter 's0'"):  # [B, HV, K, V=6] against v's V=5
        fn(*recurrence_args(v_dim_of_state=6))


def test_an_nnx_layer_checks_its_input_eagerly_and_under_nnx_jit():
    layer = GatedLinearAttention(16, 2, rngs=nnx.Rngs(0))
    call = nnx.jit(lambda layer, x: layer(x)[0])
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 16)), jnp.float32)
    assert_close(call(layer, x), layer(x)[0], F32_OUT, "jitted layer")
    for run in (layer, lambda x: call(layer, x)):
        with pytest.raises(TypeCheckError, match="parameter 'x'"):  # [T, D]: no batch axis
            run(x[0])


def test_public_ops_answer_bad_arguments_with_their_value_errors():
    q, k, v, _, _, s0 = recurrence_args()
    g = -np.ones((1, 3, 2), np.float32)
    with pytest.raises(ValueError, match="chunk_size must be a positive power of two"):
        ops.simple_gla(q, k, v, g, chunk_size=64.0)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B=1, HV=2, K=4, V=5\]"):
        ops.simple_gla(q, k, v, g, initial_state=np.zeros((1, 2, 4, 6), np.float32))
    with pytest.raises(ValueError, match="impl must be None, one of"):
        ops.simple_gla(q, k, v, g, impl=3)


def test_without_the_hook_nothing_is_wrapped_or_checked():
    """A user's import: the functions are jaxlm's own, beartype is never imported, and the
    mismatched state that fails under the tests goes unchecked."""
    script = (
        "import sys, numpy as np\n"
        "from jaxlm.ops.gla.recurrent import diagonal_recurrent\n"
        "assert diagonal_recurrent.__code__.co_filename.endswith('recurrent.py')\n"
        "assert 'beartype' not in sys.modules\n"
        "q = np.zeros((1, 3, 2, 4), np.float32)\n"
        "try:\n"
        "    diagonal_recurrent(q, q, np.zeros((1, 3, 2, 5), np.float32), np.zeros((1, 3, 2, 1), np.float32),\n"
        "                       np.zeros((1, 3), bool), np.zeros((1, 2, 4, 6), np.float32))\n"
        "except Exception as e:\n"
        "    assert 'jaxtyping' not in type(e).__module__, e\n"
        "print('unchecked')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "unchecked", out.stderr[-2000:]
    assert diagonal_recurrent.__code__.co_filename != sys.modules["jaxlm.ops.gla.recurrent"].__file__
