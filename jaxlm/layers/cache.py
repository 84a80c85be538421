"""Decode caches of the mixer layers, as NamedTuple pytrees: ``RecurrentCache`` here, and the
attention layers' ``KVCache`` from ``ops.cached_attention``, which reads and writes it.

Dimension letters used across ``jaxlm.layers``:
  B batch, T tokens in this call, D model width, H query/key heads, HV value heads,
  Hk key/value heads of softmax attention (GQA), K key (and query) head dim, V value head dim,
  L cache slots, W conv width, C conv channels, F feed-forward width, N vocabulary size.

Every mixer layer has the same interface, so that a model can stack any of them:

  y, new_cache = layer(x [B, T, D], *, segment_ids=None, cache=None)
  cache = layer.init_cache(batch_size, max_len)

Without a cache the layer runs the full sequence and returns None for the cache. With a cache
and T > 1 it prefills (the chunk form, starting from the cached state); with T == 1 it takes one
decode step (the recurrent form). In both cases the first document of the call continues the
cached one, as ``initial_state`` does in the ops.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxlm.typing import ConvState, State


class RecurrentCache(NamedTuple):
    """The cache of a linear-recurrence layer: its size does not depend on max_len."""

    state: State  # [B, HV, K, V] float32 (linear attention: [B, H, K, V+1], see linear_attention.py)
    conv: ConvState | None  # [B, W-1, C] float32, the last W-1 conv inputs; None without a short conv


def recurrence_kwargs(cache: RecurrentCache | None, length: int, impl: str | None) -> dict:
    """Keyword arguments for a recurrence op: the state from the cache, and the form to run.

    A one-token call is a decode step and runs the recurrent form; longer calls run ``impl``.
    """
    if cache is None:
        return dict(impl=impl)
    return dict(
        initial_state=cache.state,
        output_final_state=True,
        impl="recurrent" if length == 1 else impl,
    )
