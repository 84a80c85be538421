"""The training job's parts on their own: schedules, decay masks, gradient accumulation, the
masked loss, sharding rules, mesh parsing and the metrics' read-back."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm import sharding
from jaxlm.models import LM, preset
from jaxlm.training import optimizer
from jaxlm.training.metrics import MAX_LOG_LOSS, PendingMetrics, first_non_finite, with_rates
from jaxlm.training.step import LossWeights, init_state, make_train_step, masked_cross_entropy
from numerics import F32_GRAD, assert_close


def test_cosine_schedule_against_the_formula():
    lr, warmup, steps = 1e-3, 10, 110
    schedule = optimizer.learning_rate_schedule(lr, warmup, steps, "cosine", final_fraction=0.1)
    for s in (0, 5, 10, 60, 109):
        if s < warmup:
            expected = lr * s / warmup
        else:
            progress = (s - warmup) / (steps - warmup)
            expected = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert float(schedule(s)) == pytest.approx(expected, rel=1e-5, abs=1e-12), s


def test_wsd_schedule_is_flat_then_decays_to_zero():
    schedule = optimizer.learning_rate_schedule(1.0, 10, 110, "wsd", decay_fraction=0.2)
    assert float(schedule(50)) == pytest.approx(1.0)
    assert float(schedule(90)) == pytest.approx(1.0)  # the decay starts 20 steps before the end
    assert float(schedule(100)) == pytest.approx(0.5)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


def test_schedule_errors():
    with pytest.raises(ValueError, match="schedule must be one of"):
        optimizer.learning_rate_schedule(1e-3, 1, 10, "linear")
    with pytest.raises(ValueError, match="warmup"):
        optimizer.learning_rate_schedule(1e-3, 10, 10)


def test_no_weight_decay_on_vectors_a_log_and_dt_bias():
    model = LM(preset("nemotron_h"), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = optimizer.decay_mask(params)
    flat = {"/".join(sharding.path_names(path)): value for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert not any(v for name, v in flat.items() if "A_log" in name or "dt_bias" in name or "norm" in name)
    assert flat["embed/embedding"] and flat["blocks/0/mixer/in_proj/kernel"]
    assert flat["blocks/1/ffn/w_up"]


def test_masked_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    total, count = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert float(total) == pytest.approx(float((nll * mask).sum()), rel=1e-5)
    assert float(count) == mask.sum()


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches accumulate to the same update as the whole batch at once: the loss is
    the mean over all supervised tokens either way."""
    model = LM(preset("qwen3_next", n_layers=2), rngs=nnx.Rngs(0))
    tx = optax.sgd(1.0)
    schedule = optax.constant_schedule(1.0)
    graphdef, state = init_state(model, tx)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4, 9))
    mask = np.ones((4, 8), np.float32)
    mask[1, :5] = 0  # unequal token counts per micro-batch
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.zeros((4, 8), np.int32),
             "loss_mask": mask}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    weights = LossWeights(load_balancing=0.0, router_z=0.0)
    results = [
        jax.jit(make_train_step(graphdef, tx, schedule, weights, accum, False))(state, batch, jnp.int32(0))
        for accum in (1, 2)
    ]
    assert float(results[0][1]["loss"]) == pytest.approx(float(results[1][1]["loss"]), rel=1e-6)
    assert_close(results[1][0].params, results[0][0].params, F32_GRAD, "params after one SGD step")


def test_parse_mesh_and_errors():
    assert sharding.parse_mesh("data=2,expert=4") == {"data": 2, "fsdp": 1, "expert": 4, "context": 1, "tensor": 1}
    assert sharding.make_mesh("expert=4").shape == {"data": 2, "fsdp": 1, "expert": 4, "context": 1, "tensor": 1}
    assert sharding.make_mesh("context=2,tensor=2").shape == {"data": 2, "fsdp": 1, "expert": 1, "context": 2,
                                                                "tensor": 2}
    for bad in ("data=0", "model=2", "data=2,data=2", "data"):
        with pytest.raises(ValueError, match="--mesh"):
            sharding.parse_mesh(bad)
    with pytest.raises(ValueError, match="there are 8"):
        sharding.make_mesh("data=2,expert=2")


def test_sharding_rules():
    """The specs of the logical axes the layers give their parameters (tests/test_sharding.py
    checks the parameters of whole models)."""
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    d = 128

    def spec(axes, shape):
        return sharding.partition_spec(axes, shape, mesh)

    assert spec(("expert", "embed", "mlp"), (8, d, 64)) == P("expert", "fsdp", "tensor")  # w_gate
    assert spec(("embed", "heads"), (d, 256)) == P("fsdp", "tensor")  # q_proj
    assert spec(("heads", "embed"), (256, d)) == P("tensor", "fsdp")  # o_proj
    assert spec(("vocab", "embed"), (256, d)) == P("tensor", "fsdp")  # embedding
    assert spec((None,), (d,)) == P(None)  # a norm's weight
    assert spec(("embed", "heads"), (d, 3)) == P("fsdp", None)  # a_proj of 3 heads: 3 is indivisible


def test_remat_train_step_equals_the_plain_one():
    """--remat recomputes activations in the backward pass of the jitted functional step; the
    update is the same."""
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 9)))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": jnp.zeros((2, 8), jnp.int32),
             "loss_mask": jnp.ones((2, 8), jnp.float32)}
    results = []
    for remat in (False, True):
        graphdef, state = init_state(LM(preset("gdn_h1", n_layers=2, remat=remat), rngs=nnx.Rngs(0)), tx)
        step = jax.jit(make_train_step(graphdef, tx, schedule, LossWeights(), 1, False))
        results.append(step(state, batch, jnp.int32(0)))
    assert float(results[0][1]["loss"]) == pytest.approx(float(results[1][1]["loss"]), rel=1e-6)
    assert_close(results[1][0].params, results[0][0].params, F32_GRAD, "params after one SGD step")


def test_pending_metrics_come_back_in_step_order_and_the_first_non_finite_is_found():
    pending = PendingMetrics()
    for step, loss in ((1, 2.0), (2, 1.5), (3, float("nan")), (4, 1.0)):
        pending.add(step, {"loss": jnp.float32(loss), "lr": jnp.float32(step / 8)})
    assert len(pending) == 4
    records = pending.read()
    assert len(pending) == 0 and pending.read() == []
    assert [step for step, _ in records] == [1, 2, 3, 4]
    assert records[1][1] == {"loss": 1.5, "lr": 0.25} and all(type(v) is float for v in records[1][1].values())
    assert first_non_finite(records) == 2
    assert first_non_finite(records[:2]) is None
    assert first_non_finite([(7, {"loss": float("-inf")})]) == 0


def test_rates_against_the_formulas():
    got = with_rates({"loss": 2.0, "lr": 0.1}, seconds_per_step=0.5, tokens_per_step=1000, flops_per_step=6e9,
                     peak_flops=1e11)
    assert got == {"loss": 2.0, "lr": 0.1, "perplexity": pytest.approx(math.exp(2.0)), "tokens_per_second": 2000.0,
                   "mfu": pytest.approx(6e9 / 0.5 / 1e11)}
    huge = with_rates({"loss": 1e4}, seconds_per_step=1.0, tokens_per_step=1, flops_per_step=1.0, peak_flops=1.0)
    assert huge["perplexity"] == pytest.approx(math.exp(MAX_LOG_LOSS))
