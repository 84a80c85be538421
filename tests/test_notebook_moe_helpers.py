"""The helpers of the MoE notebook (colab/03_moe_sharding.ipynb), experiments/moe_routing.py: the
routers' gates, the balancing sweep, the auxiliary-loss-free bias rounds, dropless against
capacity, where expert parallelism puts the work, and the expert-parallel check on the suite's 8
fake CPU devices."""

from __future__ import annotations

import math

import jax
import matplotlib
import numpy as np
import pytest

from experiments import moe_routing as mr
from jaxlm.ops import moe as moe_ops

matplotlib.use("Agg")

E, K, N, D, F = 8, 2, 64, 8, 16


def test_skewed_logits_lean_to_the_last_experts():
    even, skewed = mr.skewed_logits(4096, E, 0.0), mr.skewed_logits(4096, E, 3.0)
    np.testing.assert_allclose(np.asarray(skewed - even), np.tile(np.linspace(0, 3, E), (4096, 1)), atol=1e-5)
    with pytest.raises(ValueError, match="skew"):
        mr.skewed_logits(4, E, -1.0)
    with pytest.raises(ValueError, match="n_tokens"):
        mr.skewed_logits(0, E, 1.0)


def test_router_gates_same_choice_different_gates():
    gates = mr.router_gates(mr.skewed_logits(N, E, 1.0), K)
    assert set(gates) == set(moe_ops.ROUTERS)
    for r in gates.values():
        np.testing.assert_array_equal(r["experts"], gates["softmax_topk"]["experts"])
    assert (gates["softmax_topk"]["gates"].sum(-1) < 1 - 1e-3).all()
    np.testing.assert_allclose(gates["topk_softmax"]["gates"].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(gates["sigmoid"]["gates"].sum(-1), 1.0, rtol=1e-6)


def test_balancing_sweep_grows_with_skew():
    rows = mr.balancing_sweep([0.0, 3.0], 4096, E, K)
    assert rows[0]["load_balancing_loss"] == pytest.approx(1.0, abs=0.02)  # even router: about 1
    assert rows[1]["load_balancing_loss"] > 1.3 and rows[1]["max_over_mean"] > 2 * rows[0]["max_over_mean"]
    assert rows[1]["router_z_loss"] > rows[0]["router_z_loss"]
    assert mr.max_over_mean([1, 1, 2, 4]) == 2.0
    with pytest.raises(ValueError, match="skews"):
        mr.balancing_sweep([], N, E, K)


# The rate is on the scale of the scores the bias is added to: probabilities, or raw logits.
@pytest.mark.parametrize("router,rate", [("softmax_topk", 0.01), ("sigmoid", 0.01), ("topk_softmax", 0.1)])
def test_bias_rounds_even_the_load_and_keep_the_gates(router, rate):
    logits = mr.skewed_logits(512, E, 3.0)
    result = mr.bias_balancing(logits, K, 100, rate, router=router)
    counts = result["counts"]
    assert counts.shape == (101, E) and (counts.sum(-1) == 512 * K).all()
    assert mr.max_over_mean(counts[0]) > 2.5
    assert max(mr.max_over_mean(c) for c in counts[-10:]) < 1.3
    assert result["gates_unchanged"]
    assert result["bias"][0] > result["bias"][-1]  # the idle expert 0 was raised above the busy E-1


def test_capacity_sweep_counts_the_drops():
    x, w = mr.tokens_and_experts(N, D, E, F)
    logits = mr.skewed_logits(N, E, 3.0)
    rows = mr.capacity_sweep(x, logits, w, K, [0.5, 8.0])
    assert [r["capacity"] for r in rows] == [math.ceil(0.5 * N * K / E), math.ceil(8.0 * N * K / E)]
    assert rows[0]["dropped_fraction"] == pytest.approx(rows[0]["dropped_by_slots"]) and rows[0]["dropped_fraction"] > 0.3
    assert rows[0]["rel_rms"] > 0.1
    assert rows[1]["dropped_fraction"] == 0.0 and rows[1]["rel_rms"] <= 1e-5  # room for all: the dropless result
    fig = mr.plot_capacity({"skew 3": rows})
    assert len(fig.axes) == 2


def test_device_loads():
    experts = np.array([[0, 7], [1, 6], [7, 6], [2, 3], [7, 0]])
    loads = mr.device_loads(experts, 4, E)
    np.testing.assert_array_equal(loads["tokens_held"], [2, 2, 1, 0])  # 5 tokens in shards of 2
    np.testing.assert_array_equal(loads["rows_computed"], [3, 2, 0, 5])  # experts 0-1, 2-3, 4-5, 6-7
    keep = np.ones(experts.shape, bool)
    keep[2, 0] = False  # token 2's expert 7 dropped
    assert mr.device_loads(experts, 4, E, keep)["rows_computed"][3] == 4
    with pytest.raises(ValueError, match="divisible"):
        mr.device_loads(experts, 3, E)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_expert_parallel_equals_one_device(capacity_factor):
    assert jax.device_count() == 8  # the suite's fake CPU devices
    x, w = mr.tokens_and_experts(N, D, E, F)
    logits = mr.skewed_logits(N, E, 1.0)
    mesh = mr.expert_mesh()
    assert dict(mesh.shape)["expert"] == 8
    check = mr.expert_parallel_check(x, logits, w, K, mesh, capacity_factor=capacity_factor)
    assert check["ok"] and check["all_to_all"] and check["shard_map"], check
    one = mr.expert_parallel_check(x, logits, w, K, mr.expert_mesh(jax.local_devices()[:1]))
    assert one["ok"] and not one["all_to_all"]  # an expert axis of 1: no exchange


def test_plots():
    logits = mr.skewed_logits(256, E, 3.0)
    fig = mr.plot_balancing(mr.balancing_sweep([0.0, 3.0], 256, E, K), mr.bias_balancing(logits, K, 5, 0.01))
    assert len(fig.axes) == 3 and len(fig.axes[2].get_lines()) >= 2
    loads = mr.device_loads(np.asarray(moe_ops.route(logits, K).experts), 4, E)
    fig = mr.plot_device_loads(loads)
    assert [len(c.patches) for c in fig.axes[0].containers] == [4, 4]
