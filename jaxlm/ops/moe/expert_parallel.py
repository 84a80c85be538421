"""Sharded execution: tokens split over the mesh, experts sharded over the axis ``expert``.

Dimension letters: N tokens, k experts per token, D model width, E experts, n devices on the
``expert`` axis, E_l = E / n experts per device, N_l tokens per device, R buffer rows.

Inside ``jax.set_mesh`` the experts run under ``jax.shard_map``. Tokens are split over the
``data``, ``fsdp`` and ``expert`` axes the mesh has; every device holds E_l experts. Routing
happens before, on all tokens, so the chosen experts and the dropped assignments are the
single-device ones. Each device then:

1. packs each assignment's token into a send buffer [n, R, D], row block j for device j;
2. ``all_to_all`` over ``expert``: block j goes to device j, which now holds the rows for its
   experts from every device;
3. runs its experts on those rows (grouped experts, as in dropless.py);
4. ``all_to_all`` back, and sums each token's returned rows with its gates.

With no ``expert`` axis, or one of size 1, steps 1, 2 and 4 vanish: each device runs its own
tokens through all the experts (data parallelism), which is also what lets tokens sharded over
Explicit axes through, where sorting a sharded axis is not allowed.

XLA:CPU has no ``ragged_all_to_all``, so the exchange is a fixed-size ``all_to_all`` whose blocks
hold the worst case: R = N_l·k rows (every assignment of one device to one device), so nothing
is ever dropped; with a capacity C, R = min(N_l·k, E_l·C), because one device's experts never
accept more than E_l·C rows. Empty rows carry the id E_l, which no expert owns.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxlm.axis_names import BATCH_AXES, EXPERT
from jaxlm.ops.moe.dropless import run_experts

EXPERT_AXIS = EXPERT
TOKEN_AXES = (*BATCH_AXES, EXPERT)  # mesh axes that split the tokens
_HIGHEST = jax.lax.Precision.HIGHEST


def active_mesh() -> AbstractMesh | None:
    """The mesh set by ``jax.set_mesh``, or None outside one (or inside a shard_map over it all)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.are_all_axes_manual:
        return None
    return mesh


def expert_axis_size() -> int:
    """Size of the active mesh's ``expert`` axis; 1 outside a mesh or without that axis."""
    mesh = active_mesh()
    return 1 if mesh is None else dict(mesh.shape).get(EXPERT_AXIS, 1)


def place(x: jax.Array, spec: P) -> jax.Array:
    """Puts x in the layout ``spec`` gives over the active mesh's Explicit axes (shard_map needs
    its inputs there, and ops such as cumsum refuse a sharded axis); Auto axes are left alone,
    for shard_map and XLA to lay out."""
    mesh = active_mesh()
    explicit = set(() if mesh is None else mesh.explicit_axes)
    if not explicit:
        return x

    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        return tuple(a for a in names if a in explicit) or None

    return jax.reshard(x, P(*(None if e is None else keep(e) for e in spec)))


def expert_parallel_moe(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    keep: jax.Array,
    w_gate: jax.Array | None,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    capacity: int | None = None,
    activation: str = "swiglu",
    impl: str | None = None,
) -> jax.Array:
    """y_n = Σ_j keep[n, j] · weights[n, j] · expert_{experts[n, j]}(x_n), sharded over the mesh.

    Must run under ``jax.set_mesh``; the ``expert`` axis size n (1 if absent) must divide E.

    Args:
      x: [N, D]. weights: [N, k] float32. experts: [N, k] int32. keep: [N, k] bool, False for
        assignments dropped by a capacity. w_gate (None for "relu2"), w_up: [E, D, F];
        w_down: [E, F, D].
      capacity: C per expert when a capacity applies (it bounds the buffers), else None.
      activation: one of experts.ACTIVATIONS. impl: the grouped_experts form.
    Returns:
      [N, D] float32, laid out like x over Explicit mesh axes.
    """
    mesh = active_mesh()
    sizes = dict(mesh.shape)
    n = sizes.get(EXPERT_AXIS, 1)
    num_experts = w_up.shape[0]
    local_experts = num_experts // n
    tokens, top_k = experts.shape
    token_axes = tuple(a for a in mesh.axis_names if a in TOKEN_AXES)
    shards = math.prod(sizes[a] for a in token_axes)
    x_spec = jax.typeof(x).sharding.spec

    # Pad the tokens to whole shards; padding rows are never sent (keep is False).
    pad = -tokens % shards
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights, experts, keep = (jnp.pad(a, ((0, pad), (0, 0))) for a in (weights, experts, keep))
    local_tokens = (tokens + pad) // shards
    rows = local_tokens * top_k
    if capacity is not None:
        rows = min(rows, local_experts * capacity)

    run = functools.partial(run_experts, activation=activation, impl=impl)

    def exchange(x, experts, keep, w_gate, w_up, w_down):
        """[N_l, D] tokens -> [N_l·k, D] expert outputs per assignment, via the expert devices."""
        dest = jnp.where(keep, experts // local_experts, n).reshape(-1)  # n: sent nowhere
        to_dest = dest[:, None] == jnp.arange(n)
        row = jnp.sum(jnp.where(to_dest, jnp.cumsum(to_dest, axis=0) - 1, 0), axis=-1)
        token = jnp.arange(local_tokens * top_k) // top_k
        # Indices with dest == n are out of bounds: the scatter drops them, the gather fills 0.
        send = jnp.zeros((n, rows, x.shape[-1]), x.dtype).at[dest, row].set(x[token], mode="drop")
        ids = jnp.full((n, rows), local_experts, jnp.int32)
        ids = ids.at[dest, row].set(experts.reshape(-1) % local_experts, mode="drop")
        recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)
        recv_ids = jax.lax.all_to_all(ids, EXPERT_AXIS, 0, 0, tiled=True)
        out = run(recv.reshape(n * rows, -1), recv_ids.reshape(-1), w_gate, w_up, w_down)
        back = jax.lax.all_to_all(out.reshape(n, rows, -1), EXPERT_AXIS, 0, 0, tiled=True)
        return back.at[dest, row].get(mode="fill", fill_value=0)

    def local(x, weights, experts, keep, w_gate, w_up, w_down):
        if n > 1:
            per_assignment = exchange(x, experts, keep, w_gate, w_up, w_down)
        else:
            ids = jnp.where(keep, experts, num_experts).reshape(-1)  # E: dropped, computed by no expert
            per_assignment = run(x[jnp.arange(ids.size) // top_k], ids, w_gate, w_up, w_down)
        gates = jnp.where(keep, weights, 0.0)
        return jnp.einsum("nk,nkd->nd", gates, per_assignment.reshape(local_tokens, top_k, -1), precision=_HIGHEST)

    tok = P(token_axes)
    expert_spec = P(EXPERT_AXIS) if n > 1 else P()
    specs = (tok,) * 4 + (expert_spec,) * 3
    # No w_gate ("relu2") travels as None, an empty pytree that its spec covers.
    inputs = (x, weights, experts, keep, w_gate, w_up, w_down)
    args = tuple(None if a is None else place(a, s) for a, s in zip(inputs, specs))
    y = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tok)(*args)
    return jax.lax.slice_in_dim(place(y, x_spec), 0, tokens)
