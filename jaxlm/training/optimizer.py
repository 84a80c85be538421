"""AdamW with warmup and a cosine or warmup-stable-decay schedule, global-norm clipping, and no
weight decay on vectors (norms, biases), A_log and dt_bias."""

from __future__ import annotations

import jax
import optax

from jaxlm.sharding import path_names

SCHEDULES = ("cosine", "wsd")
NO_DECAY_NAMES = ("A_log", "dt_bias")


def learning_rate_schedule(lr: float, warmup: int, steps: int, schedule: str = "cosine",
                           final_fraction: float = 0.1, decay_fraction: float = 0.2) -> optax.Schedule:
    """Linear warmup over ``warmup`` steps to ``lr``, then:
    cosine: cosine decay to final_fraction·lr at ``steps``;
    wsd: constant, then a linear decay to 0 over the last decay_fraction of the steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup must be in [0, steps={steps}), got {warmup}")
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
    rest = steps - warmup
    if schedule == "cosine":
        tail = optax.cosine_decay_schedule(lr, rest, alpha=final_fraction)
    else:
        decay = max(1, int(round(rest * decay_fraction)))
        tail = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay)], [rest - decay]
        )
    return optax.join_schedules([warm, tail], [warmup]) if warmup else tail


def decay_mask(params):
    """True for the parameters that take weight decay: matrices, except A_log and dt_bias."""

    def decays(path, x) -> bool:
        return x.ndim >= 2 and not set(path_names(path)) & set(NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(schedule: optax.Schedule, *, weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
          clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decay masked by ``decay_mask``)."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )
