"""What a notebook or script adapts to the runtime it finds: the platform and its devices, a
data-parallel mesh over them, the compute dtype, the ops' form choice, and the smoke flag.

  from jaxlm import runtime
  rt = runtime.detect()
  rt.platform, rt.device_count      # "tpu", 8 on a Colab TPU v2-8; "cpu", 1 on a CPU runtime
  rt.dtype                          # "bfloat16" on TPU, "float32" elsewhere (ModelConfig.dtype, --dtype)
  rt.mesh()                         # every local device on the data axis (jaxlm.sharding.make_mesh)
  rt.choose(full=4096, smoke=128)   # a size: the small one when JAXLM_NOTEBOOK_SMOKE=1

``impl`` is always None: the library's own dispatch picks the form per platform (the Pallas
kernels then the chunk form on GPU and TPU, the chunk form on CPU; see ``jaxlm.ops.dispatch``),
so a notebook passes ``impl=rt.impl`` and never names a kernel itself.

Why float32 on GPU: Colab's usual GPU, a T4, has no bfloat16 matmul units, so bfloat16 would gain
nothing there; on a newer GPU pass ``--dtype bfloat16`` (or ModelConfig(dtype="bfloat16")) yourself.
A TPU's matrix units take bfloat16, so there it is the default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.ops.dispatch import PLATFORMS
from jaxlm.ops.linear_recurrence import RECURRENCE_DEFAULTS

SMOKE_ENV = "JAXLM_NOTEBOOK_SMOKE"
"""The environment variable that shrinks every size for CI: "1" smoke, "0" or unset full size."""

# The compute dtype (a ModelConfig.dtype and a --dtype value) per platform.
COMPUTE_DTYPES = {"tpu": "bfloat16", "gpu": "float32", "cpu": "float32"}

T = TypeVar("T")


def smoke_mode(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``environ`` (default os.environ) asks for smoke sizes: JAXLM_NOTEBOOK_SMOKE "1" is
    True, "0", "" or unset False; any other value is a ValueError naming the variable."""
    value = (os.environ if environ is None else environ).get(SMOKE_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{SMOKE_ENV} must be 0 or 1 (or unset, meaning 0), got {value!r}")
    return value == "1"


def platform_of(device: Any) -> str:
    """"cpu", "gpu" or "tpu" for a jax Device (anything with ``platform``); another backend counts
    as "cpu", as it does for the ops' dispatch."""
    name = str(getattr(device, "platform", "cpu")).lower()
    return name if name in PLATFORMS else "cpu"


def compute_dtype(platform: str) -> str:
    """The compute dtype for ``platform``: "bfloat16" on TPU, "float32" on GPU and CPU."""
    if platform not in COMPUTE_DTYPES:
        raise ValueError(f"platform must be one of {list(COMPUTE_DTYPES)}, got {platform!r}")
    return COMPUTE_DTYPES[platform]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The runtime a notebook runs on (see ``detect``).

    platform: "cpu", "gpu" or "tpu". device_kind: the first device's kind, e.g. "TPU v2".
    device_count: the local devices. dtype: the compute dtype. impl: what to pass as an op's or
    ModelConfig's ``impl``: None, the platform's default list. default_forms: the forms that
    list tries for the linear recurrences here, in order. smoke: shrink every size (CI).
    """

    platform: str
    device_kind: str
    device_count: int
    dtype: str
    impl: None
    default_forms: tuple[str, ...]
    smoke: bool

    def mesh(self) -> Mesh:
        """A mesh over every local device, all on the ``data`` axis (the other axes size 1)."""
        devices = jax.local_devices()
        if len(devices) != self.device_count:
            raise ValueError(f"this Runtime describes {self.device_count} devices, but JAX has {len(devices)} local "
                             "devices; call runtime.detect() again")
        return sharding.make_mesh(None, devices)

    def choose(self, full: T, smoke: T) -> T:
        """``smoke`` in smoke mode, ``full`` otherwise: one size of a notebook's parameters cell."""
        return smoke if self.smoke else full

    def batch_size(self, rows_per_device: int) -> int:
        """A global batch of ``rows_per_device`` rows on each device, so that the data axis divides it."""
        if isinstance(rows_per_device, bool) or not isinstance(rows_per_device, int) or rows_per_device < 1:
            raise ValueError(f"rows_per_device must be an int >= 1, got {rows_per_device!r}")
        return rows_per_device * self.device_count

    def describe(self) -> str:
        """One line: platform, devices, dtype, forms and mode."""
        return (f"{self.platform}: {self.device_count} x {self.device_kind}; compute dtype {self.dtype}; "
                f"impl=None tries {list(self.default_forms)}; {'smoke' if self.smoke else 'full'} sizes")


def detect(devices: Sequence[Any] | None = None, environ: Mapping[str, str] | None = None) -> Runtime:
    """The Runtime of ``devices`` (default jax.local_devices()) and ``environ`` (default os.environ,
    read for JAXLM_NOTEBOOK_SMOKE)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must hold at least one device")
    platform = platform_of(devices[0])
    return Runtime(
        platform=platform,
        device_kind=str(getattr(devices[0], "device_kind", platform)),
        device_count=len(devices),
        dtype=compute_dtype(platform),
        impl=None,
        default_forms=tuple(RECURRENCE_DEFAULTS[platform]),
        smoke=smoke_mode(environ),
    )
