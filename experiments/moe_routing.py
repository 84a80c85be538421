"""Mixture-of-Experts at the op level, at notebook sizes: what each router chooses, what the
balancing losses measure, how DeepSeek-V3's auxiliary-loss-free bias evens the load, how many
assignments a capacity drops, and expert parallelism over a mesh against one device.

Notebooks import this file from the checkout (``from experiments import moe_routing``). Everything
runs ``jaxlm.ops.moe`` (``route``, ``moe``, ``load_balancing_loss``, ``update_selection_bias``,
``capacity_slots``) on synthetic tokens whose router logits lean toward the high expert ids by
``skew``, the imbalance a fresh router drifts into. experiments/moe_scaling.py trains real models;
its ``plot_expert_load`` draws the loads here too.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # imported as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from experiments import moe_scaling, reporting
from experiments.forms import relative_rms
from jaxlm import sharding
from jaxlm.ops import moe as moe_ops

# The numerics contract, float32: outputs, gradients; or max |a - b| <= 1e-6 outright.
F32_OUT, F32_GRAD, ABS_PASS = 1e-5, 1e-4, 1e-6
ROUTER_OPTIONS = {  # router -> renormalize, as the model families use them
    "softmax_topk": False,  # Switch, Qwen-MoE
    "topk_softmax": False,  # Mixtral
    "sigmoid": True,  # DeepSeek-V3
}


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def skewed_logits(n_tokens: int, n_experts: int, skew: float, seed: int = 0) -> jax.Array:
    """[N, E] float32 router logits: standard normal plus a ramp from 0 (expert 0) to ``skew``
    (expert E-1); skew 0 is an even router, 3 sends most tokens to the last experts."""
    _positive_int("n_tokens", n_tokens)
    _positive_int("n_experts", n_experts)
    if not np.isfinite(skew) or skew < 0:
        raise ValueError(f"skew must be a finite float >= 0, got {skew!r}")
    noise = jax.random.normal(jax.random.PRNGKey(seed), (n_tokens, n_experts))
    return noise + jnp.linspace(0.0, float(skew), n_experts)


def tokens_and_experts(n_tokens: int, d_model: int, n_experts: int, d_expert: int, seed: int = 0):
    """(x [N, D], (w_gate, w_up, w_down)) float32 SwiGLU experts at unit-variance scale."""
    for name, v in (("n_tokens", n_tokens), ("d_model", d_model), ("n_experts", n_experts), ("d_expert", d_expert)):
        _positive_int(name, v)
    ks = jax.random.split(jax.random.PRNGKey(seed + 1), 4)
    x = jax.random.normal(ks[0], (n_tokens, d_model))
    w_gate = jax.random.normal(ks[1], (n_experts, d_model, d_expert)) * d_model**-0.5
    w_up = jax.random.normal(ks[2], (n_experts, d_model, d_expert)) * d_model**-0.5
    w_down = jax.random.normal(ks[3], (n_experts, d_expert, d_model)) * d_expert**-0.5
    return x, (w_gate, w_up, w_down)


def router_gates(logits: jax.Array, top_k: int) -> dict[str, dict[str, np.ndarray]]:
    """{router: {"experts": [N, k], "gates": [N, k]}} for each of ROUTER_OPTIONS on the same logits.
    Softmax and sigmoid are monotone, so all three choose the same experts (ties aside); they
    differ in the gates: softmax→top-k keeps probabilities that sum to less than 1, top-k→softmax
    and the renormalised sigmoid give gates that sum to 1."""
    moe_ops.check_top_k(top_k, logits.shape[-1])
    out = {}
    for router, renorm in ROUTER_OPTIONS.items():
        routing = moe_ops.route(logits, top_k, router=router, renormalize=renorm)
        out[router] = dict(experts=np.asarray(routing.experts), gates=np.asarray(routing.weights))
    return out


def max_over_mean(counts) -> float:
    """The busiest expert's load over the mean load (1 is perfectly even)."""
    counts = np.asarray(counts, np.float64)
    return float(counts.max() / counts.mean())


def balancing_sweep(skews: Sequence[float], n_tokens: int, n_experts: int, top_k: int, seed: int = 0) -> list[dict]:
    """Rows {"skew", "load_balancing_loss", "router_z_loss", "max_over_mean"} for softmax→top-k
    routing of skewed_logits at each skew: the Switch loss E·Σ f_i·P_i is 1 for an even router and
    grows with the imbalance; the z-loss mean(logsumexp²) measures the logits' size."""
    if not skews:
        raise ValueError("skews must hold at least one value")
    rows = []
    for skew in skews:
        logits = skewed_logits(n_tokens, n_experts, skew, seed)
        experts = moe_ops.route(logits, top_k).experts
        rows.append(dict(skew=float(skew), load_balancing_loss=float(moe_ops.load_balancing_loss(logits, experts)),
                         router_z_loss=float(moe_ops.router_z_loss(logits)),
                         max_over_mean=max_over_mean(moe_ops.expert_counts(experts, n_experts))))
    return rows


def bias_balancing(logits: jax.Array, top_k: int, steps: int, rate: float, router: str = "sigmoid") -> dict:
    """DeepSeek-V3's auxiliary-loss-free balancing on fixed logits: ``steps`` rounds of choose with
    the selection bias, count, ``update_selection_bias``. Returns {"counts": [steps + 1, E] the load
    at each round (round 0 without bias), "bias": [E] the final bias, "gates_unchanged": whether the
    chosen experts' gates are still the unbiased scores}."""
    _positive_int("steps", steps)
    e = logits.shape[-1]
    renorm = ROUTER_OPTIONS[router]

    @jax.jit
    def step(bias):
        routing = moe_ops.route(logits, top_k, router=router, renormalize=renorm, selection_bias=bias)
        counts = moe_ops.expert_counts(routing.experts, e)
        return counts, moe_ops.update_selection_bias(bias, counts, rate), routing

    bias = jnp.zeros(e, jnp.float32)
    history = []
    for _ in range(steps + 1):
        counts, new_bias, routing = step(bias)
        history.append(np.asarray(counts))
        final_bias, bias = bias, new_bias
    # The bias chooses; the gates stay the unbiased scores of the chosen experts.
    z, chosen = np.asarray(logits, np.float64), np.asarray(routing.experts)
    if router == "topk_softmax":
        picked = np.take_along_axis(z, chosen, -1)
        gates = np.exp(picked - picked.max(-1, keepdims=True))
        gates /= gates.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-z)) if router == "sigmoid" else np.exp(z - z.max(-1, keepdims=True))
        if router == "softmax_topk":
            scores /= scores.sum(-1, keepdims=True)
        gates = np.take_along_axis(scores, chosen, -1)
    if renorm:
        gates /= gates.sum(-1, keepdims=True)
    gates_unchanged = bool(np.allclose(gates, np.asarray(routing.weights), atol=1e-6))
    return dict(counts=np.stack(history), bias=np.asarray(final_bias), gates_unchanged=gates_unchanged)


def plot_balancing(sweep: list[dict], bias: dict, path: pathlib.Path | None = None):
    """Three panels: the Switch loss and the busiest expert against skew; the busiest expert over
    the bias rounds; the load before and after the bias (moe_scaling.plot_expert_load). Returns
    the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_b, ax_e) = plt.subplots(1, 3, figsize=(16, 4.5))
    skews = [r["skew"] for r in sweep]
    ax_s.plot(skews, [r["load_balancing_loss"] for r in sweep], "o-", color="tab:blue", label="Switch loss E·Σ f·P")
    ax_s.plot(skews, [r["max_over_mean"] for r in sweep], "s--", color="tab:red", label="busiest expert / mean")
    ax_s.axhline(1.0, color="gray", lw=0.8)
    ax_s.set_xlabel("router skew (logit ramp over the experts)")
    ax_s.set_title("balance against skew (softmax → top-k)")
    ax_s.legend(fontsize=8)
    counts = bias["counts"]
    ax_b.plot(np.arange(len(counts)), counts.max(-1) / counts.mean(-1), color="tab:red")
    ax_b.axhline(1.0, color="gray", lw=0.8)
    ax_b.set_xlabel("bias update round")
    ax_b.set_ylabel("busiest expert / mean")
    ax_b.set_title("auxiliary-loss-free bias: the load evens out")
    finals = [dict(run="no bias (round 0)", variant="loss", expert_counts=counts[:1]),
              dict(run=f"bias after {len(counts) - 1} rounds", variant="bias", expert_counts=counts[-1:])]
    moe_scaling.plot_expert_load(finals, ax_e)
    ax_e.set_title("expert load, sorted, before and after the bias")
    ax_e.legend(fontsize=8)
    for ax in (ax_s, ax_b):
        ax.grid(True, alpha=0.3)
    return reporting.finish(fig, f"routing balance, E={counts.shape[-1]} experts", path)


def capacity_sweep(x: jax.Array, logits: jax.Array, weights: tuple, top_k: int,
                   factors: Sequence[float]) -> list[dict]:
    """Capacity-factor execution against dropless on the same tokens: rows {"capacity_factor",
    "capacity" (C per expert), "dropped_fraction" (the library's own, aux.dropped_fraction),
    "dropped_by_slots" (counted from capacity_slots), "rel_rms" (output against dropless)}."""
    if not factors:
        raise ValueError("factors must hold at least one capacity factor")
    def moe(x, logits, w, cf):
        with jax.default_matmul_precision("float32"):  # as the capacity path's own einsums
            return moe_ops.moe(x, logits, *w, top_k=top_k, capacity_factor=cf)

    call = jax.jit(moe, static_argnums=3)
    dropless, aux0 = call(x, logits, weights, None)
    if float(aux0.dropped_fraction) != 0.0:
        raise AssertionError("dropless execution must drop nothing")
    n, e = logits.shape
    experts = moe_ops.route(logits, top_k).experts
    rows = []
    for cf in factors:
        y, aux = call(x, logits, weights, float(cf))
        capacity = moe_ops.expert_capacity(n, top_k, e, float(cf))
        _, keep = moe_ops.capacity_slots(experts, e, capacity)
        rows.append(dict(capacity_factor=float(cf), capacity=capacity, dropped_fraction=float(aux.dropped_fraction),
                         dropped_by_slots=float(1.0 - np.mean(np.asarray(keep))), rel_rms=relative_rms(y, dropless)))
    return rows


def plot_capacity(sweeps: dict[str, list[dict]], path: pathlib.Path | None = None):
    """Dropped share of the assignments against capacity factor, one line per sweep (e.g. per
    skew), and the output's error against dropless; returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows in sweeps.items():
        cfs = [r["capacity_factor"] for r in rows]
        ax_d.plot(cfs, [100 * r["dropped_fraction"] for r in rows], "o-", label=label)
        ax_r.plot(cfs, [max(r["rel_rms"], 1e-8) for r in rows], "o-", label=label)
    ax_d.set_xlabel("capacity factor (C = ceil(factor · N·k / E))")
    ax_d.set_ylabel("assignments dropped, %")
    ax_d.set_title("capacity: dropped assignments (dropless drops none)")
    ax_r.set_yscale("log")
    ax_r.set_xlabel("capacity factor")
    ax_r.set_ylabel("relative RMS of y against dropless (floor 1e-8)")
    ax_r.set_title("what the drops cost the output")
    for ax in (ax_d, ax_r):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return reporting.finish(fig, "dropless against capacity-factor dispatch", path)


def expert_mesh(devices: Sequence | None = None):
    """A mesh with every device (default: all local devices) on the ``expert`` axis."""
    devices = list(jax.local_devices() if devices is None else devices)
    return sharding.make_mesh(f"expert={len(devices)}", devices)


def device_loads(experts, n_devices: int, n_experts: int, keep=None) -> dict[str, np.ndarray]:
    """Where expert parallelism puts the work, from the routing alone: {"tokens_held": [n] tokens
    each device holds (the tokens split evenly over the devices, padded), "rows_computed": [n]
    assignments each device's experts compute after the all-to-all (kept ones only)}."""
    _positive_int("n_devices", n_devices)
    if n_experts % n_devices:
        raise ValueError(f"n_experts={n_experts} must be divisible by n_devices={n_devices}")
    experts = np.asarray(experts)
    kept = np.ones(experts.shape, bool) if keep is None else np.asarray(keep)
    n_tokens = experts.shape[0]
    per_device = -(-n_tokens // n_devices)
    held = np.array([max(0, min(per_device, n_tokens - d * per_device)) for d in range(n_devices)])
    owner = experts[kept] // (n_experts // n_devices)
    return dict(tokens_held=held, rows_computed=np.bincount(owner, minlength=n_devices))


def expert_parallel_check(x: jax.Array, logits: jax.Array, weights: tuple, top_k: int, mesh,
                          capacity_factor: float | None = None) -> dict:
    """ops.moe under ``jax.set_mesh(mesh)`` (experts sharded over ``expert`` with all-to-all)
    against ops.moe on one device, value and gradients in x and the expert weights: {"y", "aux",
    "dx", "dweights": relative RMS errors, "ok": all within the contract, "all_to_all": whether the
    sharded program exchanges with all-to-all, "shard_map": whether it runs under shard_map}."""

    def loss(x, w, cot, logits):
        y, aux = moe_ops.moe(x, logits, *w, top_k=top_k, capacity_factor=capacity_factor)
        return jnp.sum(y * cot), (y, aux)

    cot = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    run = lambda x, w, cot: grads(x, w, cot, logits)  # logits an argument: XLA would fold a constant's top-k
    # Full float32 matmuls on both sides: a GPU's default (TF32) or a TPU's (bfloat16 passes)
    # would round differently in the differently grouped expert matmuls.
    with jax.default_matmul_precision("float32"):
        (_, (y0, aux0)), (dx0, dw0) = run(x, weights, cot)
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(run)(x, weights, cot))
            (_, (y1, aux1)), (dx1, dw1) = run(x, weights, cot)

    def err(a, b):
        return max(relative_rms(u, v) if np.max(np.abs(np.asarray(u) - np.asarray(v))) > ABS_PASS else 0.0
                   for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    out = dict(y=err(y1, y0), aux=err([aux1.load_balancing_loss, aux1.router_z_loss, aux1.dropped_fraction],
                                      [aux0.load_balancing_loss, aux0.router_z_loss, aux0.dropped_fraction]),
               dx=err(dx1, dx0), dweights=err(dw1, dw0))
    counts_equal = bool(np.array_equal(np.asarray(aux1.expert_counts), np.asarray(aux0.expert_counts)))
    out["ok"] = counts_equal and out["y"] <= F32_OUT and out["aux"] <= F32_OUT and max(out["dx"], out["dweights"]) <= F32_GRAD
    out["all_to_all"], out["shard_map"] = "all_to_all" in jaxpr, "shard_map" in jaxpr
    return out


def plot_device_loads(loads: dict[str, np.ndarray], path: pathlib.Path | None = None):
    """Bars per device: tokens it holds, and assignment rows its experts compute; returns the figure."""
    import matplotlib.pyplot as plt

    n = len(loads["tokens_held"])
    fig, ax = plt.subplots(figsize=(7, 4))
    idx = np.arange(n)
    ax.bar(idx - 0.2, loads["tokens_held"], 0.4, label="tokens held (split over the devices)")
    ax.bar(idx + 0.2, loads["rows_computed"], 0.4, label="assignments its experts compute (after all-to-all)")
    ax.set_xticks(idx)
    ax.set_xlabel("device on the expert axis")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return reporting.finish(fig, f"expert parallelism over {n} devices", path)
