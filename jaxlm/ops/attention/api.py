"""Public softmax attention over a whole sequence: argument checks and its table of forms."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.ops import nonfinite, validation
from jaxlm.ops.attention.xla import attention_xla
from jaxlm.ops.dispatch import FormTable, FormUnavailable, Impl
from jaxlm.ops.sequence import segment_starts
from jaxlm.typing import QK, AttnKeys, AttnOut, AttnValues, Documents, SegmentIds, no_type_check
from kernels_pallas.flash_attention import config as flash_attention_config
from kernels_pallas.flash_attention import flash_attention


# Every form: (q [B, T, H, D], k [B, S, Hk, D], v [B, S, Hk, Dv], document numbers [B, T] int32
# or None, *, causal, scale, window) -> o [B, T, H, Dv] in v's dtype.


def _pallas(
    q: QK, k: AttnKeys, v: AttnValues, documents: Documents | None, *, causal: bool, scale: float, window: int | None
) -> AttnOut:
    d, dv = q.shape[-1], v.shape[-1]
    if max(d, dv) > flash_attention_config.MAX_HEAD_DIM:
        raise FormUnavailable(
            f"the flash-attention kernel takes head dims up to {flash_attention_config.MAX_HEAD_DIM}, got D={d}, Dv={dv}"
        )
    return flash_attention(q, k, v, documents, causal=causal, scale=scale, window=window)


def _xla(
    q: QK, k: AttnKeys, v: AttnValues, documents: Documents | None, *, causal: bool, scale: float, window: int | None
) -> AttnOut:
    return attention_xla(q, k, v, segment_ids=documents, causal=causal, scale=scale, window=window)


ATTENTION_FORMS = FormTable(
    "attention",
    {"xla": _xla, "pallas": _pallas},
    {"cpu": ("xla",), "gpu": ("pallas", "xla"), "tpu": ("pallas", "xla")},
)


def check_attention_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int, int, int]:
    """q: [B, T, H, D]; k: [B, S, Hk, D]; v: [B, S, Hk, Dv], H a multiple of Hk.

    Returns (B, T, H, D, S, Hk, Dv).
    """
    validation.check_rank("q", q, 4, "BTHD")
    validation.check_rank("k", k, 4, ("B", "S", "Hk", "D"))
    validation.check_rank("v", v, 4, ("B", "S", "Hk", "Dv"))
    for name, x in (("q", q), ("k", k), ("v", v)):
        validation.check_float(name, x)
    b, t, h, d = np.shape(q)
    kb, s, hk, kd = np.shape(k)
    if (kb, kd) != (b, d):
        raise ValueError(f"k must have shape [B={b}, S, Hk, D={d}] to match q, got {np.shape(k)}")
    vb, vs, vh, dv = np.shape(v)
    if (vb, vs, vh) != (b, s, hk):
        raise ValueError(f"v must have shape [B={b}, S={s}, Hk={hk}, Dv] to match k, got {np.shape(v)}")
    if 0 in (b, t, h, d, s, hk, dv):
        raise ValueError(f"q, k and v must be non-empty, got q {np.shape(q)}, k {np.shape(k)}, v {np.shape(v)}")
    if h % hk != 0:
        raise ValueError(f"q's head count H={h} must be a multiple of k/v's head count Hk={hk}")
    return b, t, h, d, s, hk, dv


def check_window(window: Any) -> None:
    if window is None:
        return
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer)) or window <= 0:
        raise ValueError(f"window must be None or a positive int, got {window!r}")


@no_type_check
def attention(
    q: QK,
    k: AttnKeys,
    v: AttnValues,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    segment_ids: SegmentIds | None = None,
    impl: Impl = None,
) -> AttnOut:
    """Softmax attention, o_t = Σ_s softmax_s(scale·q_t·k_s) v_s over the keys t may see.

    Args:
      q: [B, T, H, D]. k: [B, S, Hk, D]. v: [B, S, Hk, Dv]. H must be a multiple of Hk
        (grouped-query attention: query head j reads kv head j // (H/Hk)).
      causal: query t sees keys s <= t; requires S == T.
      scale: multiplies the scores; default D**-0.5.
      window: None or a positive int. Causal: t - window < s <= t. Non-causal: |t - s| < window.
      segment_ids: [B, T] ints of packed documents (requires S == T); a document is a run of
        equal ids, as for the recurrences, and tokens of different documents never attend to
        each other (an id that comes back after another starts a new document).
      impl: "xla" (exact, materialised scores in query blocks), "pallas" (the flash-attention
        kernel of kernels_pallas, head dims up to 256; interpret mode on CPU), a sequence of them
        tried in order, or None for the platform's default list (CPU: xla; GPU, TPU: pallas, xla).
    Returns:
      o [B, T, H, Dv] in v's dtype. The softmax runs in float32; a query that sees no key
      (possible only without causal masking) gets zeros.
    """
    ATTENTION_FORMS.candidates(impl)
    b, t, _, d, s, _, dv = check_attention_qkv(q, k, v)
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if causal and s != t:
        raise ValueError(f"causal attention needs as many keys as queries: k has S={s}, q has T={t}")
    check_window(window)
    validation.check_scale(scale)
    if segment_ids is not None and s != t:
        raise ValueError(f"segment_ids needs as many keys as queries: k has S={s}, q has T={t}")
    validation.check_segment_ids(segment_ids, b, t)
    scale = d**-0.5 if scale is None else float(scale)
    window = None if window is None else int(window)
    documents = None
    if segment_ids is not None:
        documents = jnp.cumsum(segment_starts(segment_ids, b, t), axis=1, dtype=jnp.int32)
    # Non-finite values are zeroed before any form runs and put back where they reach (ops.nonfinite).
    (q, bad_queries), (k, bad_k), (v, bad_v) = (nonfinite.isolate(x, 3) for x in (q, k, v))
    bad_keys = bad_k | bad_v
    o = ATTENTION_FORMS.run(impl, q, k, v, documents, causal=bool(causal), scale=scale, window=window)
    reached = nonfinite.attention_reach(bad_keys, t, causal=bool(causal), window=window, documents=documents)
    return poison_heads(o, bad_queries, reached)


def poison_heads(o: jax.Array, bad_queries: jax.Array, reached: jax.Array) -> jax.Array:
    """o [B, T, H, Dv] NaN where the query [B, T, H] or a key it reads ([B, T, Hk] reached) is
    non-finite; query head j reads kv head j // (H/Hk)."""
    groups = o.shape[2] // reached.shape[2]
    poisoned = bad_queries | jnp.repeat(reached, groups, axis=2)
    return jnp.where(poisoned[..., None], jnp.asarray(jnp.nan, o.dtype), o)
