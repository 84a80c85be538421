"""The suite's XLA flags, for this process (conftest.py) and for the JAX processes tests start.

Its shapes are tiny, so compiling dominates the suite's time: LLVM's optimisation level 0
compiles each program in about half the time, with the same floating-point semantics (XLA:CPU
allows no reassociation at any level). The same flags in a child process also let it reuse the
session's compilation cache, whose keys include them.
"""


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for ``devices`` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
