"""The functional train and eval steps: pure functions of (params, other variables, optimizer
state, batch), jitted with explicit shardings. The NNX model is split once outside and merged
inside, so nothing stateful crosses the jit boundary.

Batch dimension letters: A gradient-accumulation micro-steps, B rows, T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import sharding
from jaxlm.models import LM


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param
    others: Any  # nnx.State of every other variable (e.g. MoE selection biases)
    opt_state: Any


@dataclass(frozen=True)
class LossWeights:
    load_balancing: float = 0.01
    router_z: float = 0.001
    selection_bias_rate: float = 1e-3  # the auxiliary-loss-free update, for configs that use it


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B, T, N] float32, targets [B, T], mask [B, T] -> (Σ mask·nll, Σ mask)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def _forward(graphdef, params, others, batch, weights: LossWeights):
    """(Σ nll + mask-count-scaled aux losses, (Σ nll, Σ mask, aux)) for one micro-batch."""
    model = nnx.merge(graphdef, params, others)
    out = model(batch["tokens"], segment_ids=batch["segment_ids"])
    nll_sum, count = masked_cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
    aux = out.aux
    objective = nll_sum
    if aux:
        # The auxiliary losses are means; scaling by the token count keeps them at their
        # coefficient once the sum is divided by the total count.
        objective += count * (weights.load_balancing * aux["load_balancing_loss"] + weights.router_z * aux["router_z_loss"])
    return objective, (nll_sum, count, aux)


def _split_micro(batch: dict, steps: int) -> dict:
    return {k: v.reshape(steps, v.shape[0] // steps, *v.shape[1:]) for k, v in batch.items()}


def make_train_step(
    graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, weights: LossWeights,
    grad_accum: int, use_selection_bias: bool,
) -> Callable:
    """(TrainState, batch of [B, T] arrays, step) -> (TrainState, metrics dict of scalars)."""

    def train_step(state: TrainState, batch: dict, step: jax.Array):
        grad_fn = jax.value_and_grad(_forward, argnums=1, has_aux=True)

        def micro(carry, mb):
            grads, nll, count = carry
            (_, (m_nll, m_count, aux)), g = grad_fn(graphdef, state.params, state.others, mb, weights)
            return (jax.tree.map(jnp.add, grads, g), nll + m_nll, count + m_count), aux

        zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.float32(0), jnp.float32(0))
        # aux comes back stacked over the micro-steps [A, ...]: counts add up, losses average.
        (grads, nll, count), aux = jax.lax.scan(micro, zeros, _split_micro(batch, grad_accum))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        others = state.others
        metrics = {"loss": nll / count, "grad_norm": optax.tree.norm(grads), "lr": schedule(step), "tokens": count}
        if aux:
            aux = {k: jnp.sum(v, 0) if k == "expert_counts" else jnp.mean(v, 0) for k, v in aux.items()}
            counts = aux["expert_counts"].astype(jnp.float32)
            metrics["load_balancing_loss"] = aux["load_balancing_loss"]
            metrics["router_z_loss"] = aux["router_z_loss"]
            # The busiest expert's load over the mean load, averaged over MoE layers: 1 is balanced.
            metrics["expert_load_max"] = jnp.mean(jnp.max(counts, -1) / jnp.maximum(jnp.mean(counts, -1), 1.0))
            if use_selection_bias:
                model = nnx.merge(graphdef, params, others)
                model.update_selection_bias(aux["expert_counts"], weights.selection_bias_rate)
                _, _, others = nnx.split(model, nnx.Param, ...)
        return TrainState(params, others, opt_state), metrics

    return train_step


def make_eval_step(graphdef, weights: LossWeights) -> Callable:
    """(TrainState, batch) -> (Σ nll, Σ mask) over the batch."""

    def eval_step(state: TrainState, batch: dict):
        _, (nll, count, _) = _forward(graphdef, state.params, state.others, batch, weights)
        return nll, count

    return eval_step


def jit_steps(graphdef, state_sh: TrainState, tx, schedule, weights: LossWeights, *, grad_accum: int,
              use_selection_bias: bool, mesh):
    """The train and eval steps, jitted with the state's shardings ``state_sh``, the batch over
    data × fsdp, and the metrics replicated."""
    batch_sh = sharding.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train = jax.jit(
        make_train_step(graphdef, tx, schedule, weights, grad_accum, use_selection_bias),
        in_shardings=(state_sh, batch_sh, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(make_eval_step(graphdef, weights), in_shardings=(state_sh, batch_sh), out_shardings=replicated)
    return train, evaluate


def init_state(model: LM, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(params, others, tx.init(params))
