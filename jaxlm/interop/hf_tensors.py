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

    ``reader.get(name)`` reads one tensor into host memory (numpy; bf16 via ml_dtypes). A missing,
    truncated or corrupt file raises ValueError naming it.
    """

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = _read_weight_map(index)
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise ValueError(f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}{_pickle_hint(self.folder)}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        for f in files:
            if not (self.folder / f).is_file():
                raise ValueError(f"{index} lists the shard {f}, which is missing from {self.folder}; "
                                 "download the checkpoint again")
        self._stack = contextlib.ExitStack()
        # safetensors reads bf16 only through a framework that has it: jax, kept on the host CPU.
        self._cpu = jax.devices("cpu")[0]
        self._handles = {}
        for f in files:
            try:
                self._handles[f] = self._stack.enter_context(safe_open(self.folder / f, framework="flax"))
            except SafetensorError as err:  # its header does not describe the file: cut short or not safetensors
                self._stack.close()
                raise ValueError(f"{self.folder / f} is not a readable safetensors file ({err}): it is truncated "
                                 "or corrupt; download or save it again") from None
        self.weight_map = weight_map or {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def file_of(self, name: str) -> Path:
        """The safetensors file that holds tensor ``name``."""
        return self.folder / self.weight_map[name]

    def get(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError

        if name not in self.weight_map:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.folder}")
        try:
            with jax.default_device(self._cpu):
                return np.asarray(self._handles[self.weight_map[name]].get_tensor(name))
        except SafetensorError as err:
            raise ValueError(f"{self.file_of(name)}: tensor {name!r} cannot be read ({err}); the file is "
                             "corrupt, download or save it again") from None

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard file); ValueError naming the index when
    it is not valid JSON or has no such map."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = f"no {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{index} is not a valid safetensors index ({detail}); it must be JSON with a "
                         '"weight_map" of tensor name to shard file, as save_pretrained writes it') from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f'{index}: "weight_map" must map each tensor name to a shard file name')
    return weight_map


def _pickle_hint(folder: Path) -> str:
    """Advice when ``folder`` holds PyTorch pickles (pytorch_model.bin) instead of safetensors."""
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if not pickles:
        return ""
    return (f"; it holds {', '.join(pickles[:3])}, PyTorch pickles, which jaxlm does not read: re-save the model "
            "with transformers' save_pretrained(folder, safe_serialization=True)")


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
        tensors = [reader.get(h) for h in rule.hf]
        specs = [targets[name].get_value() for name in rule.jx]
        try:
            arrays = rule.to_jax(tensors)
        except ValueError:  # a reshape or stack that tensors of the wrong shape cannot go through
            arrays = None
        if arrays is None or any(tuple(a.shape) != tuple(s.shape) for a, s in zip(arrays, specs)):
            raise ValueError(_wrong_shapes(rule, tensors, specs, reader))
        for name, array, spec in zip(rule.jx, arrays, specs):
            array = np.ascontiguousarray(array.astype(spec.dtype))
            values[name] = jax.device_put(array, None if mesh is None else variable_sharding(targets[name], mesh))
    unset = sorted(set(targets) - set(values))
    if unset:
        raise ValueError(f"no checkpoint tensor maps to the model variables {unset}")
    for name, var in targets.items():
        var.set_value(values[name])
    return nnx.merge(graphdef, state)


def _wrong_shapes(rule: Rule, tensors: Arrays, specs: Sequence, reader: CheckpointReader) -> str:
    """The message for checkpoint tensors whose shapes the model does not take, in the file's own
    terms: each tensor's name and stored shape, and the shape the config implies for it (the
    model's shapes mapped back through ``rule.to_hf``, not jaxlm's transposed ones)."""
    # Only the shapes matter; int8 zeros keep this small, and to_hf only moves them around.
    expected = rule.to_hf([np.zeros(spec.shape, np.int8) for spec in specs])
    wrong = [(name, tuple(t.shape), tuple(e.shape)) for name, t, e in zip(rule.hf, tensors, expected)
             if tuple(t.shape) != tuple(e.shape)]
    if not wrong:  # each shape is right, so the mapping itself is at fault, not the checkpoint
        return f"the tensors {list(rule.hf)} do not map onto the model variables {list(rule.jx)}"
    name, stored, implied = wrong[0]
    more = f" (and {len(wrong) - 1} more tensors of this group)" if len(wrong) > 1 else ""
    return (f"{reader.file_of(name)}: tensor {name} has the shape {stored}, but config.json implies {implied}{more}; "
            f"the config and the weights in {reader.folder} do not belong together")


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
