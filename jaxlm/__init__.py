"""jaxlm: efficient sequence models in JAX (linear attention, gated recurrences, hybrids, MoE)."""

from jaxlm import ops

__all__ = ["ops"]
__version__ = "0.1.0"
