"""Tensors between a Hugging Face safetensors checkpoint and a jaxlm LM.

A ``Rule`` ties a few HF tensor names to a few jaxlm parameter paths (``"blocks.0.mixer.q_proj.kernel"``)
with a function each way. Most rules are one to one (a Linear's ``weight [out, in]`` is a jaxlm
``kernel [in, out]``); fused projections split one HF tensor into several parameters, and
per-expert tensors stack into one ``[E, ...]`` parameter. Both functions work on numpy arrays
(bfloat16 through ml_dtypes) and are exact: no arithmetic, only transposes, reshapes, slices and
stacks, so loading then saving gives back the original tensors bit for bit.

Loading builds the model abstractly (``nnx.eval_shape``) and fills it one rule at a time, so
the checkpoint is never in memory twice: only the tensors of one rule are, next to the model.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxlm.sharding import variable_sharding

Arrays = list[np.ndarray]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class Rule:
    """HF tensors ``hf`` <-> jaxlm parameters ``jx``; ``to_jax(hf arrays) -> jx arrays`` and back."""

    hf: tuple[str, ...]
    jx: tuple[str, ...]
    to_jax: Callable[[Arrays], Arrays]
    to_hf: Callable[[Arrays], Arrays]


def same(hf: str, jx: str) -> Rule:
    """A tensor stored alike on both sides (norm weights, A_log, biases, embeddings)."""
    return Rule((hf,), (jx,), list, list)


def linear(hf: str, jx: str) -> Rule:
    """torch Linear ``weight [out, in]`` <-> nnx ``kernel [in, out]``."""
    return Rule((hf,), (jx,), lambda a: [a[0].T], lambda a: [a[0].T])


def conv(hf: str, jx: str) -> Rule:
    """Depthwise torch Conv1d ``weight [C, 1, W]`` <-> jaxlm ``[C, W]`` (weight[:, W-1] on the current token)."""
    return Rule((hf,), (jx,), lambda a: [a[0][:, 0, :]], lambda a: [a[0][:, None, :]])


def stacked_linear(hf_names: Sequence[str], jx: str) -> Rule:
    """E per-expert Linear weights [out, in] <-> one jaxlm parameter [E, in, out]."""
    n = len(hf_names)
    return Rule(
        tuple(hf_names), (jx,),
        lambda a: [np.stack([w.T for w in a])],
        lambda a: [a[0][e].T for e in range(n)],
    )


def grouped_rows(hf: str, jx: Sequence[str], groups: int, widths: Sequence[int], *, kernel: bool = True) -> Rule:
    """One fused HF Linear ``weight [groups·Σwidths, in]`` whose rows run, per group, through
    pieces of ``widths`` rows <-> one jaxlm parameter per piece, ``[in, groups·width]`` (a
    kernel) or ``[groups·width, in]`` rows when ``kernel=False``. Group-major order is kept inside
    each piece, so grouped heads stay in place (Qwen3-Next's per-key-head [q, k, v, z] layout)."""
    bounds = np.cumsum(widths)[:-1]

    def to_jax(a: Arrays) -> Arrays:
        w = a[0].reshape(groups, sum(widths), -1)
        parts = [p.reshape(groups * p.shape[1], -1) for p in np.split(w, bounds, axis=1)]
        return [p.T if kernel else p for p in parts]

    def to_hf(a: Arrays) -> Arrays:
        parts = [(p.T if kernel else p).reshape(groups, width, -1) for p, width in zip(a, widths)]
        return [np.concatenate(parts, axis=1).reshape(groups * sum(widths), -1)]

    return Rule((hf,), tuple(jx), to_jax, to_hf)


class CheckpointReader(contextlib.AbstractContextManager):
    """The tensors of a folder with ``model.safetensors`` or a sharded ``model.safetensors.index.json``.

    ``reader.get(name)`` reads one tensor into host memory (numpy; bf16 via ml_dtypes).
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise ValueError(f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._stack = contextlib.ExitStack()
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        # safetensors reads bf16 only through a framework that has it: jax, kept on the host CPU.
        self._cpu = jax.devices("cpu")[0]
        self._handles = {f: self._stack.enter_context(safe_open(self.folder / f, framework="flax")) for f in files}
        self.weight_map = weight_map or {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.folder}")
        with jax.default_device(self._cpu):
            return np.asarray(self._handles[self.weight_map[name]].get_tensor(name))

    def __exit__(self, *exc) -> None:
        self._stack.close()


def path_name(path: Iterable) -> str:
    return ".".join(str(p) for p in path)


def fill_model(abstract: nnx.Module, rules: Sequence[Rule], reader: CheckpointReader, mesh: Mesh | None):
    """The abstract model with every variable read through ``rules`` and placed on ``mesh`` by
    its logical axes (``jaxlm.sharding.variable_sharding``; on the default device without a
    mesh); raises ValueError on a variable the rules leave unset or a shape mismatch."""
    graphdef, state = nnx.split(abstract)
    targets = {path_name(p): v for p, v in nnx.to_flat_state(state)}
    values: dict[str, jax.Array] = {}
    for rule in rules:
        for name, array in zip(rule.jx, rule.to_jax([reader.get(h) for h in rule.hf])):
            spec = targets[name].get_value()
            if tuple(array.shape) != tuple(spec.shape):
                raise ValueError(f"{rule.hf} gives {name} the shape {array.shape}; the model expects {spec.shape}")
            array = np.ascontiguousarray(array.astype(spec.dtype))
            values[name] = jax.device_put(array, None if mesh is None else variable_sharding(targets[name], mesh))
    unset = sorted(set(targets) - set(values))
    if unset:
        raise ValueError(f"no checkpoint tensor maps to the model variables {unset}")
    for name, var in targets.items():
        var.set_value(values[name])
    return nnx.merge(graphdef, state)


def model_tensors(model: nnx.Module, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """{HF name: array} for every rule, from the model's variables."""
    flat = {path_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    used = {name for rule in rules for name in rule.jx}
    missing = sorted(set(flat) - used)
    if missing:
        raise ValueError(f"the Hugging Face mapping leaves the model variables {missing} unsaved")
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        for name, array in zip(rule.hf, rule.to_hf([np.asarray(flat[j]) for j in rule.jx])):
            out[name] = np.ascontiguousarray(array)
    return out


def write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """One ``model.safetensors`` with PyTorch metadata, as ``save_pretrained`` writes it."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    with jax.default_device(jax.devices("cpu")[0]):
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
