"""Public softmax attention: argument checks and the choice of execution form."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.ops import validation
from jaxlm.ops.attention.xla import attention_xla
from jaxlm.ops.sequence import segment_starts
from kernels_pallas.flash_attention import config as flash_attention_config
from kernels_pallas.flash_attention import flash_attention

ATTENTION_IMPLS = ("xla", "pallas")


def _check_qkv(q: Any, k: Any, v: Any) -> tuple[int, int, int, int, int, int, int]:
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


def _check_window(window: Any) -> None:
    if window is None:
        return
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer)) or window <= 0:
        raise ValueError(f"window must be None or a positive int, got {window!r}")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    impl: str | None = None,
) -> jax.Array:
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
        kernel of kernels_pallas, head dims up to 256; interpret mode on CPU) or None ("xla").
    Returns:
      o [B, T, H, Dv] in v's dtype. The softmax runs in float32; a query that sees no key
      (possible only without causal masking) gets zeros.
    """
    validation.check_impl(impl, ATTENTION_IMPLS)
    b, t, _, d, s, _, dv = _check_qkv(q, k, v)
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if causal and s != t:
        raise ValueError(f"causal attention needs as many keys as queries: k has S={s}, q has T={t}")
    _check_window(window)
    validation.check_scale(scale)
    if segment_ids is not None and s != t:
        raise ValueError(f"segment_ids needs as many keys as queries: k has S={s}, q has T={t}")
    validation.check_segment_ids(segment_ids, b, t)
    if impl == "pallas" and max(d, dv) > flash_attention_config.MAX_HEAD_DIM:
        raise ValueError(
            f"impl='pallas' supports head dims up to {flash_attention_config.MAX_HEAD_DIM}, got D={d}, Dv={dv}"
        )
    scale = d**-0.5 if scale is None else float(scale)
    window = None if window is None else int(window)
    if segment_ids is not None:
        segment_ids = jnp.cumsum(segment_starts(segment_ids, b, t), axis=1, dtype=jnp.int32)
    mask_args = dict(causal=bool(causal), scale=scale, window=window)
    if impl == "pallas":
        return flash_attention(q, k, v, segment_ids, **mask_args)
    # None is "xla": the Pallas kernel has not been measured faster on any platform yet.
    return attention_xla(q, k, v, segment_ids=segment_ids, **mask_args)
