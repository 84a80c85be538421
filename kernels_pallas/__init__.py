"""Pallas kernels for jaxlm's hot loops. Imports jax only, never jaxlm.

One folder per op, each with ``forward.py`` and ``backward.py`` kernels joined by a
``jax.custom_vjp`` in ``api.py``:
  simple_gla/       scalar-gate chunked recurrence (Mamba-2/SSD, RetNet, Lightning, linear attention)
  gla/              vector-gate chunked recurrence, 16-token secondary chunks
  delta/            (gated) delta rule: per-chunk UT/WY transform with a blocked inverse by matmuls
  flash_attention/  causal / windowed / segmented flash attention with GQA
``common.py`` holds the recurrence kernels' shared settings, in-kernel helpers and chunk drivers.

Backends: Triton on GPU, Mosaic on TPU, and the Pallas interpreter on CPU (how the tests run).
``jaxlm.ops`` reaches them with ``impl="pallas"``; ``impl=None`` keeps the XLA forms until a
kernel is measured faster on a device (experiments/gpu_kernels.py).
"""
