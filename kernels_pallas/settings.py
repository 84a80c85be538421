"""The defaults every kernel call takes when it names none itself, set for a scope by
``kernel_settings``.

    with kernels_pallas.kernel_settings(block_v=128, num_warps=8):
        o, s = ops.simple_gla(q, k, v, g, impl="pallas")

The active ``KernelSettings`` live in a ``jax.make_user_context``, which is part of ``jax.jit``'s
cache key: a jitted caller that runs under other settings traces (and compiles) again instead
of reusing a kernel built with the old ones. Kernels read the settings while they are traced and
turn them into their hashable static configuration.

Where a kernel runs (``Target``): the platform it is built for (``backend``) and how it is
executed (``interpret``):
  - ``interpret=False``: compiled, Triton on GPU, Mosaic on TPU;
  - ``interpret=True``: the generic Pallas interpreter (HLO), the default on CPU;
  - ``interpret=pltpu.InterpretParams(...)``: TPU interpret mode, the TPU kernel (its grid,
    block specs and Mosaic parameters) simulated on the CPU with TPU memory semantics and,
    with ``detect_races=True``, a race detector. The backend is then "tpu".
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, NamedTuple

import jax
from jax import lax
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ("cpu", "gpu", "tpu")
DRIVERS = ("loop", "grid")
# 3-pass TF32 keeps float32 accuracy on GPU tensor cores.
GPU_PRECISION = lax.DotAlgorithmPreset.TF32_TF32_F32_X3

Interpret = bool | pltpu.InterpretParams


def _check_interpret(interpret: Any) -> None:
    if interpret is not None and not isinstance(interpret, (bool, pltpu.InterpretParams)):
        raise ValueError(f"interpret must be None, a bool or a pltpu.InterpretParams, got {interpret!r}")


def _is_power_of_two(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """Defaults for kernel calls (None: chosen per target, as each field says). Hashable."""

    # Every kernel.
    backend: str | None = None  # "cpu", "gpu", "tpu"; None: "tpu" in TPU interpret mode, else the default backend
    interpret: Interpret | None = None  # None: the HLO interpreter on CPU, compiled elsewhere
    # The chunked-recurrence kernels.
    driver: str | None = None  # "loop" or "grid"; None: "grid" for the TPU kernel, "loop" elsewhere
    block_v: int | None = None  # value columns per program, capped at V; None: 64 on GPU, all of V elsewhere
    precision: Any = None  # of every in-kernel matmul; None: 3-pass TF32 compiled on GPU, HIGHEST elsewhere
    num_warps: int = 4  # Triton launch settings of the recurrence kernels
    num_stages: int = 1

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {self.backend!r}")
        _check_interpret(self.interpret)
        if self.driver is not None and self.driver not in DRIVERS:
            raise ValueError(f"driver must be None or one of {DRIVERS}, got {self.driver!r}")
        if self.block_v is not None and not (_is_power_of_two(self.block_v) and self.block_v >= 16):
            raise ValueError(f"block_v must be None or a power of two >= 16, got {self.block_v!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


_ACTIVE = jax.make_user_context(KernelSettings())


def current_settings() -> KernelSettings:
    """The settings in effect here (the innermost ``kernel_settings`` scope)."""
    return _ACTIVE.value


@contextlib.contextmanager
def kernel_settings(settings: KernelSettings | None = None, **changes: Any) -> Iterator[KernelSettings]:
    """A scope in which kernels take ``settings`` (default: the current ones) with ``changes``
    applied, e.g. ``kernel_settings(driver="grid")``. Yields the settings in effect."""
    base = current_settings() if settings is None else settings
    if not isinstance(base, KernelSettings):
        raise ValueError(f"settings must be a KernelSettings or None, got {settings!r}")
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(KernelSettings)})
    if unknown:
        known = [f.name for f in dataclasses.fields(KernelSettings)]
        raise ValueError(f"unknown kernel settings {unknown}; known: {known}")
    new = dataclasses.replace(base, **changes)
    with _ACTIVE(new):
        yield new


class Target(NamedTuple):
    """Where a kernel runs: the platform it is built for and how it is executed (module doc)."""

    backend: str
    interpret: Interpret

    @property
    def hlo_interpreter(self) -> bool:
        return self.interpret is True

    @property
    def tpu_kernel(self) -> bool:
        """The TPU kernel: compiled by Mosaic, or simulated in TPU interpret mode."""
        return self.backend == "tpu" and not self.hlo_interpreter


def resolve_target(backend: str | None = None, interpret: Interpret | None = None) -> Target:
    """The call's own ``backend`` and ``interpret`` where given, else the current settings', else
    the defaults: TPU interpret mode builds for "tpu"; otherwise the default backend, interpreted
    (HLO) on CPU only."""
    settings = current_settings()
    interpret = settings.interpret if interpret is None else interpret
    backend = settings.backend if backend is None else backend
    _check_interpret(interpret)
    tpu_interpret = isinstance(interpret, pltpu.InterpretParams)
    if backend is None:
        backend = "tpu" if tpu_interpret else jax.default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if tpu_interpret and backend != "tpu":
        raise ValueError(f"interpret=InterpretParams (TPU interpret mode) needs backend 'tpu', got {backend!r}")
    if interpret is None:
        interpret = backend == "cpu"
    return Target(backend, interpret)
