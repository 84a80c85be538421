"""Peak FLOP/s of one device: the denominator of MFU.

Accelerators are looked up by ``device.device_kind`` in a table of vendor datasheet figures,
dense (the "with sparsity" figures are twice these) and per JAX device. Anything else (CPU, or
an accelerator missing from the table) is measured: the best rate of a jitted square matmul.

Per JAX device:
  - TPU v4 and v5p run as megacore, one device per chip: the chip's figure.
  - TPU v2, v3 and 7x show each TensorCore as a device: half the chip's figure.
  - v5e and v6e have one TensorCore per chip.

float32 is JAX's default matmul precision:
  - TF32 tensor cores on NVIDIA Ampere and later;
  - bf16 MXU passes on TPU, which publishes no separate fp32 figure, so its bf16 peak is used;
  - the CUDA-core FP32 rate on GPUs without TF32 (T4, V100).
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

DTYPES = ("bfloat16", "float16", "float32")

# The matmul probe: side of the square matrices per platform, and its limits.
PROBE_SIZE = {"cpu": 1024}
PROBE_SIZE_ACCELERATOR = 2048
PROBE_REPEATS = 5
PROBE_TIME_BUDGET_S = 1.0


@dataclass(frozen=True)
class DevicePeak:
    """Dense peak FLOP/s of one JAX device of a kind, and the datasheet it comes from."""

    name: str
    bfloat16: float
    float16: float
    float32: float  # at JAX's default f32 matmul precision (see the module docstring)
    source: str

    def flops(self, dtype: str) -> float:
        return {"bfloat16": self.bfloat16, "float16": self.float16, "float32": self.float32}[dtype]


TERA = 1e12
_SPARSE = "with sparsity, halved"


def _tpu(name: str, tflops: float, source: str) -> DevicePeak:
    peak = tflops * TERA
    return DevicePeak(name, peak, peak, peak, f"{source}; f32 matmuls run as bf16 MXU passes")


def _nvidia(name: str, bf16: float, tf32: float, source: str) -> DevicePeak:
    return DevicePeak(name, bf16 * TERA, bf16 * TERA, tf32 * TERA, f"{source}; float32 as TF32 tensor cores")


def _pre_ampere(name: str, fp16: float, fp32: float, source: str) -> DevicePeak:
    source = f"{source}; no bf16 tensor cores, so bf16 gets the fp32 rate"
    return DevicePeak(name, fp32 * TERA, fp16 * TERA, fp32 * TERA, source)


# (pattern searched in the lower-cased device_kind, peak in TFLOP/s per JAX device). The first
# match wins, so specific names come first.
PEAKS: tuple[tuple[str, DevicePeak], ...] = (
    (r"^tpu v2\b", _tpu("TPU v2", 22.5, "Google Cloud TPU v2: 45 bf16 per chip, 2 TensorCores")),
    (r"^tpu v3\b", _tpu("TPU v3", 61.5, "Google Cloud TPU v3: 123 bf16 per chip, 2 TensorCores")),
    (r"^tpu v4 lite\b", _tpu("TPU v4i", 137, "Google TPU v4i: 137 bf16 per chip")),
    (r"^tpu v4\b", _tpu("TPU v4", 275, "Google Cloud TPU v4: 275 bf16 per chip (megacore)")),
    (r"^tpu v5 ?lite\b|^tpu v5e\b", _tpu("TPU v5e", 197, "Google Cloud TPU v5e: 197 bf16 per chip")),
    (r"^tpu v5p?$", _tpu("TPU v5p", 459, "Google Cloud TPU v5p: 459 bf16 per chip (megacore)")),
    (r"^tpu v6 ?lite\b|^tpu v6e\b", _tpu("TPU v6e", 918, "Google Cloud TPU v6e Trillium: 918 bf16 per chip")),
    (r"^tpu ?7x$", _tpu("TPU7x", 1153.5, "Google Cloud TPU7x Ironwood: 2307 bf16 per chip, 2 TensorCores")),
    (r"\bgb200\b", _nvidia("GB200", 2500, 1250, f"NVIDIA GB200 NVL72: 5000 bf16, 2500 TF32 {_SPARSE}")),
    (r"\bb200\b", _nvidia("B200", 2250, 1100, f"NVIDIA HGX B200: 4500 bf16, 2200 TF32 {_SPARSE}")),
    (r"\bgh200\b", _nvidia("GH200", 989, 494, f"NVIDIA GH200: 1979 bf16, 989 TF32 {_SPARSE}")),
    (r"\bh200 nvl\b", _nvidia("H200 NVL", 835, 417.5, f"NVIDIA H200 NVL: 1671 bf16, 835 TF32 {_SPARSE}")),
    (r"\bh200\b", _nvidia("H200 SXM", 989, 494, f"NVIDIA H200 SXM: 1979 bf16, 989 TF32 {_SPARSE}")),
    (r"\bh100 nvl\b", _nvidia("H100 NVL", 835, 417.5, f"NVIDIA H100 NVL: 1671 bf16, 835 TF32 {_SPARSE}")),
    (r"\bh100 pcie\b", _nvidia("H100 PCIe", 756, 378, f"NVIDIA H100 PCIe: 1513 bf16, 756 TF32 {_SPARSE}")),
    (r"\bh100\b", _nvidia("H100 SXM", 989, 494, f"NVIDIA H100 SXM: 1979 bf16, 989 TF32 {_SPARSE}")),
    (r"\ba100\b", _nvidia("A100", 312, 156, "NVIDIA A100: 312 bf16, 156 TF32, dense")),
    (r"\bl40s\b", _nvidia("L40S", 362, 183, f"NVIDIA L40S: 733 bf16, 366 TF32 {_SPARSE}")),
    (r"\bl4\b", _nvidia("L4", 121, 60, f"NVIDIA L4: 242 bf16, 120 TF32 {_SPARSE}")),
    (r"\ba10\b", _nvidia("A10", 125, 62.5, "NVIDIA A10: 125 bf16, 62.5 TF32, dense")),
    (r"\bt4\b", _pre_ampere("T4", 65, 8.1, "NVIDIA T4: 65 fp16 tensor cores, 8.1 fp32")),
    (r"\bv100\b.*\bpcie\b", _pre_ampere("V100 PCIe", 112, 14, "NVIDIA V100 PCIe: 112 fp16, 14 fp32")),
    (r"\bv100\b", _pre_ampere("V100 SXM2", 125, 15.7, "NVIDIA V100 SXM2: 125 fp16, 15.7 fp32")),
)


def lookup_peak(device_kind: str) -> DevicePeak | None:
    """The table entry for a ``device.device_kind`` string, or None."""
    kind = device_kind.strip().lower()
    for pattern, peak in PEAKS:
        if re.search(pattern, kind):
            return peak
    return None


_probe_cache: dict[tuple, float] = {}
_probe_lock = threading.Lock()


def measure_matmul_flops(device: Any = None, dtype: str = "float32") -> float:
    """Best FLOP/s of a jitted n×n matmul on ``device`` over a few timed repeats (cached per process).

    n is 1024 on CPU and 2048 on accelerators; at most PROBE_REPEATS repeats within about
    PROBE_TIME_BUDGET_S after compilation.
    """
    _check_dtype(dtype)
    device = jax.devices()[0] if device is None else device
    key = tuple(getattr(device, name, None) for name in ("platform", "device_kind", "id")) + (dtype,)
    with _probe_lock:
        if key not in _probe_cache:
            _probe_cache[key] = _probe(device, dtype)
        return _probe_cache[key]


def _probe(device: Any, dtype: str) -> float:
    n = PROBE_SIZE.get(device.platform, PROBE_SIZE_ACCELERATOR)
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.device_put(jax.random.normal(k, (n, n), dtype), device) for k in keys)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile and warm up
    best, start = math.inf, time.perf_counter()
    for _ in range(PROBE_REPEATS):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > PROBE_TIME_BUDGET_S:
            break
    return 2.0 * n**3 / best


def peak_flops_per_second(device: Any = None, dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one device for matmuls in ``dtype``, where that number comes from).

    device: a jax Device or anything with ``device_kind`` (and ``platform``); default the first
    device. dtype: "bfloat16", "float16" or "float32". A device kind in ``PEAKS`` gets its
    datasheet figure; a CPU, or an unknown accelerator (with a warning in the description), the
    matmul probe's best measured rate.
    """
    _check_dtype(dtype)
    device = jax.devices()[0] if device is None else device
    kind = str(getattr(device, "device_kind", ""))
    peak = lookup_peak(kind)
    if peak is not None:
        return peak.flops(dtype), f"{peak.name} {dtype}, datasheet TFLOP/s: {peak.source}"
    platform = getattr(device, "platform", "unknown")
    flops = measure_matmul_flops(device, dtype)
    n = PROBE_SIZE.get(platform, PROBE_SIZE_ACCELERATOR)
    probe = f"matmul probe: best of up to {PROBE_REPEATS} jitted {n}x{n} {dtype} matmuls on {kind or platform}"
    if platform == "cpu":
        return flops, f"CPU {probe}"
    return flops, f"WARNING: {kind!r} ({platform}) is not in the peak table, so this is a measured {probe}"


def _check_dtype(dtype: object) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
