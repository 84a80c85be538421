"""Device mesh, logical-axis sharding rules for parameters and batches, and multi-host start-up.

The mesh has four named axes:
  data    batch rows; parameters replicated
  fsdp    batch rows too, and parameters sharded over their model-width axis (ZeRO-3 style)
  expert  MoE experts (the MoE layer runs them with shard_map and all-to-all over this axis)
  tensor  the hidden, head and vocabulary axes of the matmuls (Megatron style, through GSPMD)

Every parameter axis gets a logical name from its size and role (``logical_axes``), and
``RULES`` maps logical names to mesh axes. An axis whose size the mesh axis does not divide
stays replicated, so any preset runs on any mesh.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis
RULES = {"embed": "fsdp", "hidden": "tensor", "vocab": "tensor", "expert": "expert"}

# Parameter names (the last path entry, or its parent for nnx.Linear's "kernel") whose leading
# axis counts experts.
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def parse_mesh(spec: str | None) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}; None or '' -> all 1."""
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
    if "data=" not in (spec or "").replace(" ", "") and len(devices) % product == 0:
        sizes["data"] *= len(devices) // product
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


def logical_axes(path: tuple, shape: tuple[int, ...], d_model: int) -> tuple[str | None, ...]:
    """Logical names of a parameter's axes: 'expert' for the expert axis of MoE weights,
    'embed' for an axis of size d_model, 'vocab' for the embedding's vocabulary axis, 'hidden'
    for the other axis of a matrix; vectors and small tensors stay unnamed (replicated)."""
    names = path_names(path)
    if len(shape) < 2:
        return (None,) * len(shape)
    axes: list[str | None] = []
    for i, size in enumerate(shape):
        if i == 0 and len(shape) == 3 and names[-1] in EXPERT_WEIGHTS:
            axes.append("expert")
        elif "embedding" in names[-1:] and i == 0:
            axes.append("vocab")
        elif size == d_model:
            axes.append("embed")
        else:
            axes.append("hidden")
    # One mesh axis may shard only one tensor axis: keep the first 'embed' (square matrices).
    if axes.count("embed") > 1:
        first = axes.index("embed")
        axes = [a if a != "embed" or i == first else "hidden" for i, a in enumerate(axes)]
    if axes.count("hidden") > 1:
        first = axes.index("hidden")
        axes = [a if a != "hidden" or i == first else None for i, a in enumerate(axes)]
    return tuple(axes)


def partition_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh, d_model: int) -> P:
    """The PartitionSpec of one parameter under RULES; indivisible axes stay replicated."""
    spec = []
    for name, size in zip(logical_axes(path, shape, d_model), shape):
        axis = RULES.get(name) if name else None
        spec.append(axis if axis and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0 else None)
    return P(*spec)


def state_shardings(state, mesh: Mesh, d_model: int):
    """NamedShardings for a pytree of arrays (an nnx.State of parameters or an optimizer state
    that mirrors it): parameter-shaped leaves by RULES, the rest replicated."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(path, np.shape(x), mesh, d_model)), state
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over data × fsdp; the time axis whole."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


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
