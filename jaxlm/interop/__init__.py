"""Import and export of other formats: ``jaxlm.interop.hf`` reads and writes Hugging Face checkpoints."""

from jaxlm.interop import hf

__all__ = ["hf"]
