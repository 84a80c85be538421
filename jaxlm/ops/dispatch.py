"""One way to choose an op's execution form.

Each op family registers its forms in one ``FormTable``: a name for each form, every form with
the family's one signature, and the names tried, in order, for ``impl=None`` on each platform.
``impl`` is then

- ``None``: the platform's default list (``FormTable.defaults``);
- a name: that form alone. It runs, or the call raises a ``ValueError`` naming the form and why
  it cannot run; it never falls back to another form;
- a sequence of names: each tried in order until one runs.

A form that cannot take the given shapes, dtype or platform raises ``FormUnavailable`` before it
computes anything, and the next listed form runs. The choice is made when the op is traced, so a
jitted caller compiles only the form that was chosen. A failure the form cannot foresee at trace
time (a kernel that fails to compile) is not caught: name the forms explicitly to avoid it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

PLATFORMS = ("cpu", "gpu", "tpu")


class FormUnavailable(Exception):
    """Raised by a form that cannot take these inputs here; the message says why."""


def platform() -> str:
    """The platform the op is traced for: "cpu", "gpu" or "tpu" (any other backend counts as "cpu",
    whose defaults are the plain XLA forms)."""
    backend = jax.default_backend()
    return backend if backend in PLATFORMS else "cpu"


Impl = str | Sequence[str] | None


@dataclasses.dataclass(frozen=True)
class FormTable:
    """The forms of one op family.

    op: the family's name, for messages. forms: name -> form, all with one signature.
    defaults: platform -> the form names ``impl=None`` tries, in order.
    """

    op: str
    forms: Mapping[str, Callable[..., Any]]
    defaults: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        for name, order in self.defaults.items():
            unknown = [f for f in order if f not in self.forms]
            if name not in PLATFORMS or unknown or not order:
                raise ValueError(f"{self.op}: bad default list for {name!r}: {order!r}")
        missing = [p for p in PLATFORMS if p not in self.defaults]
        if missing:
            raise ValueError(f"{self.op}: no default form list for {missing}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.forms)

    def candidates(self, impl: Any) -> tuple[str, ...]:
        """The form names ``impl`` asks for, in order; a ValueError for an impl that names none
        of the forms (this is impl's check, so it takes any value)."""
        if impl is None:
            return self.defaults[platform()]
        names = (impl,) if isinstance(impl, str) else impl
        if isinstance(names, Sequence) and names and all(isinstance(n, str) for n in names):
            unknown = [n for n in names if n not in self.forms]
            if not unknown:
                return tuple(names)
        raise ValueError(
            f"impl must be None, one of {list(self.forms)} or a sequence of them tried in order, got {impl!r}"
        )

    def run(self, impl: Any, *args: Any, **kwargs: Any) -> Any:
        """Runs the first form of ``candidates(impl)`` that can take the arguments."""
        names = self.candidates(impl)
        reasons = []
        for name in names:
            try:
                return self.forms[name](*args, **kwargs)
            except FormUnavailable as why:
                reasons.append(f"{name!r}: {why}")
        if isinstance(impl, str):
            raise ValueError(f"{self.op} impl={impl!r} cannot run here: {reasons[0].split(': ', 1)[1]}")
        listed = "the default forms" if impl is None else "impl"
        raise ValueError(f"{self.op}: none of {listed} {list(names)} can run here ({'; '.join(reasons)})")
