"""Flax NNX modules that hold parameters and call jaxlm.ops (dimension legend: layers/cache.py)."""

from jaxlm.layers.attention import Attention
from jaxlm.layers.cache import RecurrentCache
from jaxlm.layers.embedding import Embedding
from jaxlm.layers.gated_deltanet import GatedDeltaNet, l2_normalize
from jaxlm.layers.gla import GatedLinearAttention
from jaxlm.layers.kda import KimiDeltaAttention
from jaxlm.layers.lightning import LightningAttention, lightning_log_decay
from jaxlm.layers.linear_attention import LinearAttention
from jaxlm.layers.mamba2 import Mamba2
from jaxlm.layers.mla import LatentCache, MultiHeadLatentAttention
from jaxlm.layers.mlp import Relu2MLP, SwiGLU, feed_forward
from jaxlm.layers.moe import MoE, RouterBias
from jaxlm.layers.norms import GatedRMSNorm, RMSNorm, gated_rms_norm, rms_norm
from jaxlm.layers.rotary import apply_rope, rope_frequencies

__all__ = [
    "Attention", "Embedding", "GatedDeltaNet", "GatedLinearAttention", "GatedRMSNorm", "KimiDeltaAttention",
    "LatentCache", "LightningAttention", "LinearAttention", "Mamba2", "MoE", "MultiHeadLatentAttention",
    "RMSNorm", "RecurrentCache", "Relu2MLP", "RouterBias", "SwiGLU", "apply_rope", "feed_forward",
    "gated_rms_norm", "l2_normalize", "lightning_log_decay", "rms_norm", "rope_frequencies",
]
