"""What each gate does to the state over time, for the linear-attention notebook's heat maps.

Every recurrence keeps S_t [K, V] (one row per key channel) and updates it as
S_t = A_t S_{t-1} + (write of token t). ``state_row_norms`` runs an op one token at a time
through the public API (``initial_state`` in, the final state out, the recurrent form) and
records ||S_t[i, :]|| for every step t and key channel i:

  linear attention   A_t = 1: nothing is forgotten, the rows only grow;
  Mamba-2 / SSD      A_t = exp(g_t), one scalar per head: every row decays together, and a
                     strongly negative g_t wipes the state at once;
  GLA                A_t = diag(exp(g_t)), one decay per key channel: slow rows remember, fast rows forget;
  Gated DeltaNet     the scalar decay, then the delta rule S += k (β (v − Sᵀk))ᵀ, which overwrites
                     what the state holds for k instead of adding to it, so the rows stay bounded.

``inputs`` builds gates that make this visible: a constant scalar decay with one full reset
halfway, per-channel decays spread from slow to fast (time constants 500 to 1.5 steps), and unit-norm keys.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # imported as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from experiments import reporting
from jaxlm import ops

OPS = {
    "linear_attn": "linear attention: no gate",
    "simple_gla": "Mamba-2 / SSD: one scalar decay per head",
    "gla": "GLA: a decay per key channel",
    "gated_delta_rule": "Gated DeltaNet: scalar decay + delta rule",
}
RESET_LOG_DECAY = -30.0  # exp(-30) ≈ 1e-13: the scalar gate at the reset step forgets everything
SLOWEST_MEMORY, FASTEST_MEMORY = 500.0, 1.5  # GLA's channels' time constants τ, in steps: decay exp(−1/τ)


def inputs(t: int, k: int = 16, v: int = 16, seed: int = 0) -> dict[str, jax.Array]:
    """One sequence, one head: q, k [1, t, 1, k] (k unit-norm), v [1, t, 1, v]; g [1, t, 1]: log 0.95
    at every step but step t // 2, where it is RESET_LOG_DECAY; gk [1, t, 1, k] = −1/τ_i: channel i
    remembers for τ_i steps, geometrically spaced from SLOWEST_MEMORY (i = 0) down to FASTEST_MEMORY
    (i = k − 1); beta [1, t, 1] = 0.5."""
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in (t, k, v)):
        raise ValueError(f"t, k and v must be ints >= 2, got t={t!r}, k={k!r}, v={v!r}")
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    keys = jax.random.normal(kk, (1, t, 1, k))
    g = jnp.full((1, t, 1), np.log(0.95), jnp.float32).at[:, t // 2].set(RESET_LOG_DECAY)
    per_channel = -1.0 / jnp.geomspace(SLOWEST_MEMORY, FASTEST_MEMORY, k, dtype=jnp.float32)
    return dict(
        q=jax.random.normal(kq, (1, t, 1, k)),
        k=keys / jnp.linalg.norm(keys, axis=-1, keepdims=True),
        v=jax.random.normal(kv, (1, t, 1, v)),
        g=g,
        gk=jnp.broadcast_to(per_channel, (1, t, 1, k)),
        beta=jnp.full((1, t, 1), 0.5, jnp.float32),
    )


def _step(op: str, x: dict[str, jax.Array], state: jax.Array) -> jax.Array:
    """The state after one token (x's arrays have T = 1)."""
    common = dict(initial_state=state, output_final_state=True, impl="recurrent")
    if op == "linear_attn":
        return ops.linear_attn(x["q"], x["k"], x["v"], **common)[1]
    if op == "simple_gla":
        return ops.simple_gla(x["q"], x["k"], x["v"], x["g"], **common)[1]
    if op == "gla":
        return ops.gla(x["q"], x["k"], x["v"], x["gk"], **common)[1]
    return ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **common)[1]


def _states(op: str, x: dict[str, jax.Array]) -> jax.Array:
    _, t, h, dk = x["k"].shape
    dv = x["v"].shape[-1]

    def scan_step(state, token):
        new = _step(op, {name: a[:, None] for name, a in token.items()}, state)
        return new, new[0, 0]

    per_token = {name: jnp.moveaxis(a, 1, 0) for name, a in x.items()}  # time first, for lax.scan
    _, history = jax.lax.scan(scan_step, jnp.zeros((1, h, dk, dv), jnp.float32), per_token)
    return history


_states_jit = jax.jit(_states, static_argnums=0)


def states(op: str, x: dict[str, jax.Array]) -> np.ndarray:
    """S_t for every step: [T, K, V] (batch 0, head 0), one op call per token from a zero state,
    with matmuls at full float32 precision (a TPU's default would round their inputs to bfloat16)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    with jax.default_matmul_precision("float32"):
        return np.asarray(_states_jit(op, x))


def state_row_norms(op: str, x: dict[str, jax.Array]) -> np.ndarray:
    """||S_t[i, :]|| for every step t and key channel i: [T, K]."""
    return np.linalg.norm(states(op, x), axis=-1)


def plot(norms: dict[str, np.ndarray], path: pathlib.Path | None = None):
    """One heat map per op of ``norms`` ({op: [T, K]}): key channel against time, colour the row norm
    (one shared scale). Returns the figure."""
    import matplotlib.pyplot as plt

    unknown = [op for op in norms if op not in OPS]
    if not norms or unknown:
        raise ValueError(f"norms must map ops of {list(OPS)} to [T, K] arrays, got {list(norms)}")
    top = max(float(np.max(n)) for n in norms.values())
    fig, axes = plt.subplots(len(norms), 1, figsize=(9, 2.1 * len(norms)), sharex=True, squeeze=False)
    for ax, (op, n) in zip(axes[:, 0], norms.items()):
        image = ax.imshow(np.asarray(n).T, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=top,
                          interpolation="nearest")
        ax.set_title(OPS[op], fontsize=10)
        ax.set_ylabel("key channel")
        fig.colorbar(image, ax=ax, label="‖S_t[i, :]‖")
    axes[-1, 0].set_xlabel("step t")
    return reporting.finish(fig, "the state's rows over time", path)
