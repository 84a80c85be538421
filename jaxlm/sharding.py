"""Device mesh, logical-axis sharding rules for parameters and batches, and multi-host start-up.

The mesh has the named axes of ``jaxlm.axis_names.MESH_AXES``: data, fsdp, expert, context and
tensor (what each splits: see that module). Every parameter carries the logical names of its
axes as nnx metadata, given where the layer creates it (``jaxlm.layers.initializers``), and
``RULES`` maps logical names to mesh axes. An axis whose size the mesh axis does not divide stays
replicated, so any preset runs on any mesh.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.axis_names import BATCH_AXES, DATA, EMBED, EXPERT, FSDP, HEADS, MESH_AXES, METADATA_KEY, MLP, TENSOR, VOCAB

# logical axis -> mesh axis. No parameter maps to ``context``: it splits activations only.
RULES = {VOCAB: TENSOR, EMBED: FSDP, HEADS: TENSOR, MLP: TENSOR, EXPERT: EXPERT}


def parse_mesh(spec: str | None) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'fsdp': 1, 'expert': 4, 'context': 1, 'tensor': 1};
    None or '' -> all 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    given: set[str] = set()
    for part in filter(None, (spec or "").replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1 or name in given:
            raise ValueError(
                f"--mesh must be comma-separated AXIS=SIZE with AXIS in {list(MESH_AXES)} (each once) "
                f"and SIZE a positive int, e.g. 'data=2,expert=4'; got {spec!r}"
            )
        sizes[name] = int(value)
        given.add(name)
    return sizes


def make_mesh(spec: str | None, devices: list | None = None) -> Mesh:
    """A mesh over all devices. When the given sizes multiply to less than the device count and
    ``data`` was not given, ``data`` takes the remaining factor."""
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(spec)
    product = int(np.prod(list(sizes.values())))
    if f"{DATA}=" not in (spec or "").replace(" ", "") and len(devices) % product == 0:
        sizes[DATA] *= len(devices) // product
        product = len(devices)
    if product != len(devices):
        raise ValueError(f"--mesh {spec!r} gives {sizes} = {product} devices, but there are {len(devices)}")
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def path_names(path: tuple) -> list[str]:
    """The names along a pytree key path (dict keys, attributes, indices as strings), without
    nnx.Variable's own ``value`` field: ('blocks', '0', 'mixer', 'q_proj', 'kernel')."""
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    return [n for n in names if n != "value"]


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical names of a variable's axes from its metadata; all None (replicated) for a
    variable created without them."""
    ndim = len(np.shape(variable.get_value()))
    axes = tuple(variable.get_metadata().get(METADATA_KEY, (None,) * ndim))
    if len(axes) != ndim or any(a is not None and a not in RULES for a in axes):
        raise ValueError(f"{METADATA_KEY} must give each of {ndim} axes a name of {list(RULES)} or None, got {axes!r}")
    return axes


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """The PartitionSpec of an array whose axes have the logical names ``axes``, under RULES.

    An axis stays replicated when its mesh axis is absent from the mesh, has size 1, does not
    divide the axis, or already shards an earlier axis of the same array."""
    sizes = dict(mesh.shape)
    spec: list[str | None] = []
    for name, size in zip(axes, shape, strict=True):
        axis = RULES.get(name) if name else None
        usable = axis is not None and sizes.get(axis, 1) > 1 and size % sizes[axis] == 0 and axis not in spec
        spec.append(axis if usable else None)
    return P(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """Where a variable lives on ``mesh``: its logical axes under RULES (see partition_spec)."""
    return NamedSharding(mesh, partition_spec(logical_axes(variable), np.shape(variable.get_value()), mesh))


def state_shardings(state, mesh: Mesh):
    """NamedShardings for a pytree of nnx variables and arrays (an nnx.State of parameters, or an
    optimizer state whose moments mirror it): each variable by its logical axes under RULES,
    every other leaf replicated. Variables keep their place, holding their NamedSharding."""

    def shard(path, x):
        if not isinstance(x, nnx.Variable):
            return NamedSharding(mesh, P())
        try:
            return x.replace(variable_sharding(x, mesh))
        except ValueError as e:
            raise ValueError(f"{'.'.join(path_names(path))}: {e}") from None

    return jax.tree_util.tree_map_with_path(shard, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over data × fsdp; the time axis whole."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local_rows, mesh: Mesh):
    """This process's rows [B / processes, T] (numpy) -> one global array [B, T] over the mesh."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows)


def cluster_described() -> bool:
    """Whether the environment describes a multi-process job: an explicit JAX coordinator, a
    SLURM job of several tasks, an Open MPI world of several ranks, or a multi-host TPU slice."""
    env = os.environ
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )


def initialize_distributed() -> bool:
    """Joins the other processes through jax.distributed when the environment describes a
    cluster (see cluster_described); returns whether it did. With JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID give the rest; otherwise JAX detects the cluster."""
    if not cluster_described():
        return False
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set, so {missing} must be set too")
        jax.distributed.initialize(
            env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    return True
