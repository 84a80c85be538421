"""Config dataclasses, presets and the decoder LM."""

from jaxlm.models.config import FFNS, MIXERS, ModelConfig
from jaxlm.models.lm import LM, LMOutput, count_params
from jaxlm.models.presets import FAMILIES, SIZES, preset

__all__ = ["FAMILIES", "FFNS", "LM", "LMOutput", "MIXERS", "ModelConfig", "SIZES", "count_params", "preset"]
