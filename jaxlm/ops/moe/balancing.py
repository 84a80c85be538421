"""Load balancing: the Switch auxiliary loss, the router z-loss and DeepSeek-V3's bias update.

Dimension letters: N tokens, E experts, k experts per token. The loss coefficients are applied
by the model and the trainer, not here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """[N, k] expert ids -> [E] int32: how many (token, slot) assignments chose each expert."""
    # A one-hot sum rather than bincount: its scatter cannot take tokens sharded over an
    # Explicit mesh axis, while a sum over the sharded axis is a plain all-reduce.
    return jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.int32), axis=(0, 1))


def load_balancing_loss(logits: jax.Array, experts: jax.Array) -> jax.Array:
    """Switch-Transformer balance loss E · Σ_i f_i · P_i, a float32 scalar.

    f_i is the fraction of the N·k assignments that went to expert i (they sum to 1) and P_i is
    the mean over tokens of expert i's softmax probability over all experts. It equals 1 when
    the probabilities are uniform, and its gradient flows through P only (f comes from top-k).

    Args:
      logits: [N, E] router logits. experts: [N, k] the chosen experts.
    """
    num_experts = logits.shape[-1]
    fraction = expert_counts(experts, num_experts).astype(jnp.float32) / experts.size
    mean_prob = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0)
    return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)², a float32 scalar. logits: [N, E]."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def update_selection_bias(bias: jax.Array, counts: jax.Array, rate: float | jax.Array) -> jax.Array:
    """DeepSeek-V3 auxiliary-loss-free balancing: one step of the selection-bias update.

    An overloaded expert (count above the mean) has its bias lowered by ``rate``, an
    underloaded one raised by ``rate``, so later tokens lean toward the idle experts.

    Args:
      bias: [E] float32 current selection bias. counts: [E] assignments per expert (summed over
        the batch, e.g. ``aux.expert_counts``). rate: the step γ (DeepSeek-V3 uses 1e-3).
    Returns:
      [E] the new bias, in bias's dtype.
    """
    counts = counts.astype(jnp.float32)
    step = rate * jnp.sign(jnp.mean(counts) - counts)
    return (bias.astype(jnp.float32) + step).astype(bias.dtype)
