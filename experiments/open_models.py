"""The open-models notebook's measurements (colab/05_open_models.ipynb): the frontier hybrids'
layouts as jaxlm presets, their total and active parameters, their decode caches against context,
and a real checkpoint's logits beside transformers'.

Notebooks import this file from the checkout (``from experiments import open_models``, with the
repository root on sys.path). The counts are ``jaxlm.models.count_params`` and
``jaxlm.models.active_params``, the FLOPs ``jaxlm.models.flops``; the cache split is
``experiments.long_context.cache_bytes``'s, with MLA's latent cache counted among the attention
caches (cache_bytes counts it as recurrent), for many contexts from one abstract model. Nothing
is allocated for a preset.
"""

from __future__ import annotations

import pathlib
import sys
from collections import Counter
from collections.abc import Mapping, Sequence

if __package__ in (None, ""):  # imported as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from flax import nnx

from experiments import reporting
from jaxlm.layers.mla import LatentCache
from jaxlm.models import LM, ModelConfig, preset
from jaxlm.models.active_params import param_counts
from jaxlm.models.flops import flops_per_token
from jaxlm.ops import KVCache

# The lecture's frontier hybrids (jaxlm preset -> the model family it lays out), and the baseline.
FRONTIER = {"qwen3_next": "Qwen3-Next", "nemotron_h": "Nemotron-H", "minimax": "MiniMax-01", "kimi_linear": "Kimi Linear"}
BASELINE = {"transformer": "transformer (all attention)"}
MODELS = {**FRONTIER, **BASELINE}
MIXER_NAMES = {"A": "attention", "W": "sliding-window attention", "C": "MLA", "G": "Gated DeltaNet", "M": "Mamba-2",
               "L": "Lightning", "K": "KDA", "N": "linear attention", "V": "GLA", "R": "DeltaNet"}
KV_MIXERS = "AWC"  # the mixers whose cache grows with the context (MLA's holds a latent per token)
COLORS = {"qwen3_next": "tab:blue", "nemotron_h": "tab:green", "minimax": "tab:purple", "kimi_linear": "tab:orange",
          "transformer": "tab:red"}
FLOPS_CONTEXT = 4096  # the sequence length of the reported forward FLOPs per token


def _check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise ValueError(f"names must be a non-empty list of {list(MODELS)}, got {list(names)!r}")


def _check_contexts(contexts: Sequence[int]) -> None:
    if not contexts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in contexts):
        raise ValueError(f"contexts must be a non-empty sequence of positive ints, got {contexts!r}")


def layout(config: ModelConfig) -> str:
    """The layer stack in words, e.g. "3 Gated DeltaNet + 1 attention; MoE in 4 layers: 8 experts, top-2, 1 shared"."""
    kinds = config.layer_kinds()
    mixers = Counter(m for m, _ in kinds if m != "-")
    text = " + ".join(f"{n} {MIXER_NAMES.get(m, m)}" for m, n in mixers.items())
    moe = sum(f == "E" for _, f in kinds)
    if moe:
        shared = f", {config.n_shared_experts} shared" if config.n_shared_experts else ""
        text += f"; MoE in {moe} layers: {config.n_experts} experts, top-{config.top_k}{shared}"
    return text


def model_rows(size: str, names: Sequence[str] = tuple(MODELS)) -> list[dict]:
    """Per preset at ``size``: its layout, KV layers, total and active parameters
    (``param_counts``) and forward FLOPs per token at FLOPS_CONTEXT tokens."""
    _check_names(names)
    rows = []
    for name in names:
        config = preset(name, size)
        counts = param_counts(config)
        kinds = config.layer_kinds()
        rows.append(dict(name=name, label=MODELS[name], size=size, layer_pattern=config.layer_pattern,
                         n_layers=config.n_layers, layout=layout(config),
                         kv_layers=sum(m in KV_MIXERS for m, _ in kinds),
                         mixer_layers=sum(m != "-" for m, _ in kinds), **counts,
                         active_fraction=counts["active"] / counts["total"],
                         gflops_per_token=flops_per_token(config, FLOPS_CONTEXT, training=False) / 1e9))
    return rows


def cache_sizes(config: ModelConfig, contexts: Sequence[int], batch_size: int = 1) -> dict[int, dict[str, int]]:
    """{context: {"kv", "recurrent", "total"}}: the bytes of ``init_cache(batch_size, context)``
    from one abstract model (shapes only): "kv" the attention layers' caches, softmax attention's
    KVCache and MLA's LatentCache (its compressed latent and RoPE key per slot), "recurrent" the
    recurrent layers' states and conv states."""
    _check_contexts(contexts)
    model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    out = {}
    for context in contexts:
        shapes = jax.eval_shape(lambda n=context: model.init_cache(batch_size=batch_size, max_len=n))
        size = dict(kv=0, recurrent=0)
        for layer in shapes:
            if layer is not None:
                size["kv" if isinstance(layer, (KVCache, LatentCache)) else "recurrent"] += sum(
                    x.size * x.dtype.itemsize for x in jax.tree.leaves(layer))
        out[context] = size | dict(total=size["kv"] + size["recurrent"])
    return out


def cache_rows(size: str, contexts: Sequence[int], names: Sequence[str] = tuple(MODELS), dtype: str = "bfloat16") -> list[dict]:
    """Per preset at ``size`` (caches in ``dtype``) and context: its decode cache's bytes for one row."""
    _check_names(names)
    rows = []
    for name in names:
        for context, b in cache_sizes(preset(name, size, dtype=dtype), contexts).items():
            rows.append(dict(name=name, label=MODELS[name], size=size, dtype=dtype, context=context, kv_bytes=b["kv"],
                             recurrent_bytes=b["recurrent"], total_bytes=b["total"]))
    return rows


def by_context(rows: list[dict], name: str) -> dict[int, dict]:
    """{context: row} of one model's cache rows."""
    out = {r["context"]: r for r in rows if r["name"] == name}
    if not out:
        raise ValueError(f"no cache rows for {name!r}")
    return out


def plot_params(rows: list[dict], path: pathlib.Path | None = None):
    """Total and active parameters per preset, as bars; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["total"] / 1e6 for r in rows], 0.4, color="0.7", label="total")
    ax.bar(x + 0.2, [r["active"] / 1e6 for r in rows], 0.4, color=[COLORS[r["name"]] for r in rows], label="active")
    ax.set_xticks(x, [r["label"] for r in rows], rotation=15)
    ax.set_ylabel("parameters (millions)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    return reporting.finish(fig, f"jaxlm presets at size {rows[0]['size']}: total and active parameters", path)


def plot_cache(rows: list[dict], path: pathlib.Path | None = None):
    """Decode cache bytes per row against context, log-log, one line per preset; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = sorted(by_context(rows, name).items())
        ax.loglog([c for c, _ in pts], [r["total_bytes"] for _, r in pts], marker="o", color=COLORS[name],
                  label=MODELS[name], ls="--" if name in BASELINE else "-")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"decode cache, bytes per row ({rows[0]['dtype']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return reporting.finish(fig, f"decode cache against context, presets at size {rows[0]['size']}", path)


def greedy_text(model: LM, tokenizer, prompt: str, new_tokens: int) -> str:
    """``prompt`` and its greedy continuation of ``new_tokens`` tokens (``jaxlm.generate``), decoded."""
    from jaxlm.generate import generate

    ids = np.asarray(tokenizer.encode(prompt), np.int32)[None]
    return tokenizer.decode(np.asarray(generate(model, ids, new_tokens, temperature=0.0)[0]).tolist())  # prompt first


def logits_against_transformers(model: LM, folder: str | pathlib.Path, tokens: np.ndarray) -> Mapping[str, float] | None:
    """jaxlm's float32 logits for ``tokens`` [B, T] against transformers' for the checkpoint
    ``folder`` (loaded in float32, eager attention), jaxlm's matmuls at full float32 precision:
    {"max_abs", "rel_rms", "top1_agreement"}; None when torch or transformers is not installed."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids [B, T], got {tokens.dtype} {tokens.shape}")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = ref(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    with jax.default_matmul_precision("float32"):  # a TPU's default would round matmul inputs to bfloat16
        ours = np.asarray(model(jax.numpy.asarray(tokens, jax.numpy.int32)).logits, np.float32)
    diff = (ours.astype(np.float64) - theirs)
    return dict(max_abs=float(np.max(np.abs(diff))),
                rel_rms=float(np.sqrt(np.mean(diff**2)) / (np.sqrt(np.mean(theirs.astype(np.float64) ** 2)) + 1e-8)),
                top1_agreement=float(np.mean(ours.argmax(-1) == theirs.argmax(-1))))
