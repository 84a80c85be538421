"""Router scores and top-k expert choice.

Dimension letters: N tokens, E experts, k experts per token.

Three ways to turn router logits into gates, as the main model families do it:

- ``"softmax_topk"``: softmax over all E experts, then keep the k largest (Switch, Qwen-MoE).
  The kept weights sum to less than 1 unless ``renormalize``.
- ``"topk_softmax"``: keep the k largest logits, then softmax over those k (Mixtral). The
  weights already sum to 1, so ``renormalize`` changes nothing.
- ``"sigmoid"``: an independent sigmoid score per expert (DeepSeek-V3), usually with
  ``renormalize=True``.

A selection bias (DeepSeek-V3's auxiliary-loss-free balancing) is added to the scores only to
choose the experts; the gates are the unbiased scores of the chosen experts, and no gradient
reaches the bias.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid")


class Routing(NamedTuple):
    """Which experts each token goes to, and with what weight."""

    weights: jax.Array  # [N, k] float32 gates of the chosen experts
    experts: jax.Array  # [N, k] int32 expert ids, best first


def check_router(router: str) -> None:
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {list(ROUTERS)}, got {router!r}")


def route(
    logits: jax.Array,
    top_k: int,
    *,
    router: str = "softmax_topk",
    renormalize: bool = False,
    selection_bias: jax.Array | None = None,
) -> Routing:
    """Chooses top_k experts per token.

    Args:
      logits: [N, E] router logits (computed in float32 by the caller).
      top_k: experts per token, 1 <= top_k <= E.
      router: one of ROUTERS (see the module docstring).
      renormalize: divide the k gates by their sum.
      selection_bias: optional [E], added to the scores for the choice only.
    Returns:
      Routing with weights and experts, both [N, top_k]. Ties go to the lower expert id.
    """
    check_router(router)
    logits = logits.astype(jnp.float32)
    if router == "softmax_topk":
        scores = jax.nn.softmax(logits, axis=-1)
    elif router == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:  # topk_softmax: choose on the raw logits
        scores = logits
    choice = scores
    if selection_bias is not None:
        choice = scores + jax.lax.stop_gradient(selection_bias.astype(jnp.float32))
    _, experts = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if router == "topk_softmax":
        weights = jax.nn.softmax(weights, axis=-1)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights=weights, experts=experts.astype(jnp.int32))
