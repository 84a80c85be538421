"""Pallas kernels for jaxlm's hot loops. Imports jax only, never jaxlm.

One folder per op, each with ``forward.py`` and ``backward.py`` kernels joined by a
``jax.custom_vjp`` in ``api.py``:
  simple_gla/       scalar-gate chunked recurrence (Mamba-2/SSD, RetNet, Lightning, linear attention)
  gla/              vector-gate chunked recurrence, 16-token secondary chunks
  delta/            (gated) delta rule: per-chunk UT/WY transform with a blocked inverse by matmuls
  kda/              Kimi Delta Attention: the delta rule with per-channel decays, 16-token sub-blocks
  flash_attention/  causal / windowed / segmented flash attention with GQA
What the recurrence kernels share:
  recurrence_config.py  the kernel layout and the static, hashable configuration of one call
  chunked_driver.py     the "loop" and "grid" drivers (pallas_call) and the custom VJP
  tile_math.py          in-kernel math on 2-D values; scalar_decays.py the decays of a scalar gate
``settings.py`` holds ``KernelSettings``, the defaults of every kernel call (target, driver,
value blocks, precision, Triton launch settings), set for a scope with ``kernel_settings``:

    with kernels_pallas.kernel_settings(block_v=128):
        ...  # jitted callers trace again under new settings (they are part of jit's cache key)

Targets: Triton on GPU, Mosaic on TPU, the HLO interpreter on CPU (the default there), and TPU
interpret mode (``interpret=pltpu.InterpretParams(...)``), which runs the TPU kernels on CPU with
TPU memory semantics and race detection. ``jaxlm.ops`` reaches the kernels with ``impl="pallas"``.
"""

from kernels_pallas.settings import KernelSettings, current_settings, kernel_settings

__all__ = ["KernelSettings", "current_settings", "kernel_settings"]
