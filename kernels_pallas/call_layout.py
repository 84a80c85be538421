"""How a traced function's Pallas kernels are laid out, read from the ``pallas_call`` equations
of its jaxpr: the grid, each operand's block shape and index map, the scratch buffers, and a
``fori_loop``/scan inside the kernel body (the "loop" driver's walk over chunks).

    from kernels_pallas.call_layout import kernel_layouts
    for layout in kernel_layouts(lambda x: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], impl="pallas"), x):
        print(layout.describe(("head", "v block", "chunk")))

Nothing here is a second description of the kernels: every number comes from what the kernel
code handed to ``pl.pallas_call`` when the function was traced (nothing is compiled or run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core
from jax.experimental import pallas as pl

# Primitives an index map computes with, written infix.
_INFIX = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "div": "//", "rem": "%"}


@dataclasses.dataclass(frozen=True)
class Operand:
    """One input or output of a pallas_call. block: the block's shape, None for a dimension the
    kernel does not see (squeezed, e.g. the head); index_map: the block index as a function of the
    grid indices, as text."""

    origin: str  # e.g. "args[0]", "outputs[1]"
    array_shape: tuple[int, ...]
    dtype: str
    block: tuple[int | None, ...]
    index_map: str


@dataclasses.dataclass(frozen=True)
class KernelLoop:
    """A loop inside the kernel body: its trip count and the shapes it carries (the counter too)."""

    length: int
    carry: tuple[tuple[tuple[int, ...], str], ...]


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """One pallas_call. grid: programs along each grid axis; dimension_semantics: the Mosaic
    ("parallel"/"arbitrary") axis kinds, None where the call carries no TPU compiler parameters;
    interpret: how the call runs: "compiled", "HLO interpreter" (interpret=True, the CPU default) or
    "TPU interpret mode (InterpretParams)"; scratch: (shape, dtype,
    memory space) of each scratch buffer; loops: the loops at the top of the kernel body."""

    name: str
    grid: tuple[int, ...]
    dimension_semantics: tuple[str, ...] | None
    interpret: str
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    scratch: tuple[tuple[tuple[int, ...], str, str], ...]
    loops: tuple[KernelLoop, ...]

    @property
    def programs(self) -> int:
        """How many kernel instances the grid launches."""
        count = 1
        for n in self.grid:
            count *= n
        return count

    def describe(self, axis_names: Sequence[str] | None = None, input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None) -> str:
        """A few lines for a person: the grid (axes named by ``axis_names`` where given), every
        operand's array, block and index map (operands named by ``input_names`` and
        ``output_names`` where given, in order), the scratch buffers and the in-kernel loops."""
        names = _axis_names(len(self.grid), axis_names)
        labels = {}
        for given, operands, what in ((input_names, self.inputs, "input_names"),
                                      (output_names, self.outputs, "output_names")):
            if given is not None:
                if len(given) != len(operands):
                    raise ValueError(f"{what} must name all {len(operands)} operands of {self.name}, got {given!r}")
                labels.update({op.origin: f"{name} ({op.origin})" for op, name in zip(operands, given)})
        axes = ", ".join(f"{n} {name}" for n, name in zip(self.grid, names))
        kinds = f", semantics {list(self.dimension_semantics)}" if self.dimension_semantics else ""
        lines = [f"{self.name}: grid ({axes}) = {self.programs} programs{kinds}; {self.interpret}"]
        for kind, operands in (("in ", self.inputs), ("out", self.outputs)):
            for op in operands:
                block = "[" + ", ".join("·" if d is None else str(d) for d in op.block) + "]"
                lines.append(f"  {kind} {labels.get(op.origin, op.origin):24s} {op.dtype}{list(op.array_shape)} block {block} "
                             f"at {_rename(op.index_map, names)}")
        for shape, dtype, space in self.scratch:
            lines.append(f"  scratch {dtype}{list(shape)} in {space}, kept across the grid's steps")
        for loop in self.loops:
            carried = ", ".join(f"{dtype}{list(shape)}" for shape, dtype in loop.carry)
            lines.append(f"  in-kernel loop of {loop.length} steps carrying ({carried})")
        return "\n".join(lines)


def _axis_names(n: int, axis_names: Sequence[str] | None) -> tuple[str, ...]:
    if axis_names is None:
        return tuple(f"i{a}" for a in range(n))
    if len(axis_names) < n or not all(isinstance(a, str) and a for a in axis_names):
        raise ValueError(f"axis_names must name each of the {n} grid axes, got {axis_names!r}")
    return tuple(axis_names[:n])


def _rename(text: str, names: Sequence[str]) -> str:
    """An index map written with the grid placeholders ⟨0⟩, ⟨1⟩, ... put in terms of ``names``."""
    for a, name in enumerate(names):
        text = text.replace(f"⟨{a}⟩", name)
    return text


def _index_map_text(closed: Any) -> str:
    """``(⟨0⟩, ⟨1⟩) -> (⟨0⟩, 3 - ⟨1⟩, 0)``: an index-map jaxpr as an expression of the grid indices."""
    jaxpr = closed.jaxpr
    env: dict[Any, str] = {}
    for a, var in enumerate(jaxpr.invars):
        env[var] = f"⟨{a}⟩"
    for var, const in zip(jaxpr.constvars, closed.consts):
        env[var] = str(const)

    def read(atom: Any) -> str:
        if isinstance(atom, jex_core.Literal):
            value = atom.val
            return str(int(value) if getattr(value, "dtype", None) is not None and value.dtype.kind in "iu" else value)
        return env[atom]

    for eqn in jaxpr.eqns:
        args = [read(a) for a in eqn.invars]
        name = eqn.primitive.name
        if name in _INFIX and len(args) == 2:
            text = f"({args[0]} {_INFIX[name]} {args[1]})"
        elif name in ("convert_element_type", "copy", "pjit", "jit") and len(args) == 1:
            text = args[0]
        else:
            text = f"{name}({', '.join(args)})"
        for out in eqn.outvars:
            env[out] = text
    ins = ", ".join(f"⟨{a}⟩" for a in range(len(jaxpr.invars)))
    outs = ", ".join(_unwrap(read(v)) for v in jaxpr.outvars)
    return f"({ins}) -> ({outs})"


def _unwrap(text: str) -> str:
    """``text`` without one pair of parentheses around all of it."""
    if not (text.startswith("(") and text.endswith(")")):
        return text
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and i < len(text) - 1:
            return text  # the first parenthesis closes before the end: "(a) + (b)"
    return text[1:-1]


def _block_dims(block_shape: Sequence[Any]) -> tuple[int | None, ...]:
    dims = []
    for d in block_shape:
        if d is None or isinstance(d, pl.Squeezed):
            dims.append(None)
        elif isinstance(d, pl.Blocked):
            dims.append(int(d.block_size))
        else:
            dims.append(int(getattr(d, "block_size", d)))
    return tuple(dims)


def _operand(mapping: Any) -> Operand:
    aval = mapping.array_aval
    return Operand(origin=str(mapping.origin), array_shape=tuple(aval.shape), dtype=str(aval.dtype),
                   block=_block_dims(mapping.block_shape), index_map=_index_map_text(mapping.index_map_jaxpr))


def _scan_carry_count(eqn: Any) -> int:
    """How many of a scan's outputs are its carry: the ``num_carry`` parameter where the JAX version
    has one, else the leading outputs shaped as the body's (the stacked outputs gain a length axis)."""
    if "num_carry" in eqn.params:
        return int(eqn.params["num_carry"])
    body = eqn.params["jaxpr"]
    count = 0
    for out, inner in zip(eqn.outvars, getattr(body, "out_avals", ())):
        if tuple(out.aval.shape) != tuple(inner.shape):
            break
        count += 1
    return count


def _top_loops(kernel_jaxpr: Any) -> tuple[KernelLoop, ...]:
    loops = []
    for eqn in kernel_jaxpr.eqns:
        if eqn.primitive.name == "scan":
            carry = eqn.outvars[: _scan_carry_count(eqn)]
            loops.append(KernelLoop(int(eqn.params["length"]),
                                    tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in carry)))
    return tuple(loops)


def _memory_space(aval: Any) -> str:
    text = str(aval)  # e.g. Ref<vmem>{float32[64,64]}
    return text[text.index("<") + 1 : text.index(">")] if "<" in text and ">" in text else "default"


def _interpret_text(interpret: Any) -> str:
    if interpret is False:
        return "compiled"
    if interpret is True:
        return "HLO interpreter"
    return f"TPU interpret mode ({type(interpret).__name__})"


def layout_of(eqn: Any) -> KernelLayout:
    """The KernelLayout of one pallas_call equation."""
    if eqn.primitive.name != "pallas_call":
        raise ValueError(f"eqn must be a pallas_call equation, got {eqn.primitive.name!r}")
    gm = eqn.params["grid_mapping"]
    mappings = list(gm.block_mappings)
    n_in = gm.num_inputs
    semantics = getattr(eqn.params.get("compiler_params"), "dimension_semantics", None)
    scratch = tuple((tuple(a.shape), str(a.dtype), _memory_space(a)) for a in gm.scratch_avals)
    return KernelLayout(
        name=str(eqn.params["name"]),
        grid=tuple(int(n) for n in gm.grid),
        dimension_semantics=None if semantics is None else tuple(str(s).split(".")[-1].lower() for s in semantics),
        interpret=_interpret_text(eqn.params["interpret"]),
        inputs=tuple(_operand(m) for m in mappings[:n_in]),
        outputs=tuple(_operand(m) for m in mappings[n_in:]),
        scratch=scratch,
        loops=_top_loops(eqn.params["jaxpr"]),
    )


def equations_outside_kernels(jaxpr: Any) -> list:
    """Every equation of a jaxpr (or ClosedJaxpr) and of its sub-jaxprs (jit, custom_vjp, scan,
    ...), in program order, without entering the bodies of Pallas kernels."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    eqns = []
    for eqn in jaxpr.eqns:
        eqns.append(eqn)
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    eqns += equations_outside_kernels(inner)
    return eqns


def pallas_call_eqns(jaxpr: Any) -> list:
    """The pallas_call equations of a jaxpr, looking inside every sub-jaxpr, in call order."""
    return [e for e in equations_outside_kernels(jaxpr) if e.primitive.name == "pallas_call"]


def pallas_call_names(jaxpr: Any) -> list[str]:
    """The names of the kernels a jaxpr calls, in order."""
    return [str(e.params["name"]) for e in pallas_call_eqns(jaxpr)]


def kernel_layouts(fn: Callable, *args: Any, **kwargs: Any) -> list[KernelLayout]:
    """The layout of every Pallas kernel ``fn(*args, **kwargs)`` calls, in call order, from its
    traced jaxpr (``jax.make_jaxpr``; the current ``kernel_settings`` apply)."""
    return [layout_of(eqn) for eqn in pallas_call_eqns(jax.make_jaxpr(fn)(*args, **kwargs))]
