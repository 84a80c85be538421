"""More parameters at the same compute: a dense model against MoE models of E experts, top-2,
whose active FLOPs per token equal the dense model's, on the same training tokens.

  python experiments/moe_scaling.py [--experts 4 8 16 32] [--bias-experts 8 32] [--steps 800]
      [--batch-size 8] [--seq-len 256] [--lr 3e-3] [--eval-every 100] [--out experiments/moe_scaling]
  python experiments/moe_scaling.py --quick     # E = 4 only, a few steps: the pipeline, no claim

The dense model is ``preset("transformer", "tiny")``: 4 layers of softmax attention and a SwiGLU of
width 496, d_model 128, the byte vocabulary. Each MoE model replaces every SwiGLU by E routed SwiGLU
experts, softmax router, top-2 renormalised, of the width ``match_active_flops`` solves for: the
forward FLOPs per token of ``jaxlm.models.flops`` (router, two experts) equal the dense model's to
the nearest integer width (the table printed at the start gives both counts). Every model trains
with the trainer's own functional step (``jaxlm.training.step``: AdamW, warmup and cosine, clip 1.0)
on the same batches of the embedded corpus, in the same order, for the same number of steps, and
is evaluated on the same validation batches.

Two balancing variants: every E trains with the first, the E of --bias-experts also with the second.
  loss  the Switch load-balancing loss, coefficient 0.01 (and the router z-loss, 0.001);
  bias  auxiliary-loss-free (DeepSeek-V3): no balancing loss, ``ModelConfig.use_selection_bias``
        and the trainer's bias update after each step, rate --bias-rate (the z-loss stays).
At the end the expert load, tokens per expert over the validation batches, is kept per layer.

Outputs: OUT.csv (one row per evaluation of each run; the last row of a run also holds its expert
counts as JSON) and OUT.png: validation loss against steps, final validation loss against total
parameters, and the final expert load. One colour per E, one line style per variant.

Notebook helpers, with the checkout's root on sys.path (``from experiments import moe_scaling``):
``match_active_flops``, ``model_configs``, ``train_run``, ``expert_load``, ``read_rows`` and
``plot`` / ``plot_expert_load``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import sys
import tempfile
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import reporting
from jaxlm import data
from jaxlm.models import LM, ModelConfig, count_params, preset
from jaxlm.models.flops import flops_per_token
from jaxlm.training import optimizer
from jaxlm.training.step import LossWeights, init_state, make_eval_step, make_train_step

HERE = pathlib.Path(__file__).resolve().parent
# One colour per model (dense and each E), one line style per balancing variant.
E_COLORS = {0: "black", 4: "tab:blue", 8: "tab:orange", 16: "tab:green", 32: "tab:red", 64: "tab:purple"}
VARIANT_STYLES = {"dense": "-", "loss": "-", "bias": "--"}
FIELDS = ["run", "n_experts", "variant", "d_ff", "params_total", "params_active", "train_flops_per_token", "step",
          "tokens", "train_loss", "val_loss", "expert_load_max", "seconds", "expert_counts"]


def dense_config(**overrides) -> ModelConfig:
    """The dense baseline: the tiny transformer preset."""
    return preset("transformer", "tiny", **overrides)


def match_active_flops(dense: ModelConfig, n_experts: int, top_k: int, seq_len: int) -> int:
    """The expert width whose MoE twin of ``dense`` (every feed-forward E experts, top_k each) has
    the forward FLOPs per token closest to the dense model's at seq_len."""
    if dense.ffn_pattern != "D":
        raise ValueError(f"dense must have ffn_pattern 'D', got {dense.ffn_pattern!r}")
    target = flops_per_token(dense, seq_len, training=False)

    def flops(width: int) -> float:
        return flops_per_token(_moe(dense, n_experts, top_k, width), seq_len, training=False)

    # FLOPs grow by top_k·6·D per unit of width per layer; start from the linear solution.
    guess = max(1, round((3 * dense.d_ff - n_experts) / (3 * top_k)))
    return min(range(max(1, guess - 3), guess + 4), key=lambda w: abs(flops(w) - target))


def _moe(dense: ModelConfig, n_experts: int, top_k: int, d_expert: int, **overrides) -> ModelConfig:
    return dense.replace(ffn_pattern="E", n_experts=n_experts, top_k=top_k, d_expert=d_expert, renormalize=True,
                         router="softmax_topk", **overrides)


def active_params(config: ModelConfig) -> int:
    """Parameters a token passes through: all but the unchosen experts (and the input embedding,
    counted once when tied)."""
    total = count_params(config)
    if "E" not in config.ffn_pattern:
        return total
    matrices = 2 if config.mlp_activation == "relu2" else 3
    per_expert = matrices * config.d_model * config.resolved_d_expert
    moe_layers = sum(f == "E" for _, f in config.layer_kinds())
    return total - moe_layers * (config.n_experts - config.top_k) * per_expert


@dataclass(frozen=True)
class Run:
    label: str
    n_experts: int  # 0 for the dense model
    variant: str  # "dense", "loss" or "bias"
    config: ModelConfig
    weights: LossWeights


def model_configs(experts: list[int], bias_experts: list[int], seq_len: int, bias_rate: float, top_k: int = 2,
                  dense: ModelConfig | None = None) -> list[Run]:
    """The dense run, then for each E of ``experts`` the balancing-loss run and, if E is in
    ``bias_experts``, the auxiliary-loss-free run, experts sized by ``match_active_flops``."""
    dense = dense_config() if dense is None else dense
    unknown = sorted(set(bias_experts) - set(experts))
    if unknown:
        raise ValueError(f"bias_experts must be among experts {experts}, got {unknown}")
    runs = [Run("dense", 0, "dense", dense, LossWeights())]
    for e in experts:
        width = match_active_flops(dense, e, top_k, seq_len)
        for variant in ("loss", "bias") if e in bias_experts else ("loss",):
            if variant == "loss":
                runs.append(Run(f"E{e}-loss", e, "loss", _moe(dense, e, top_k, width), LossWeights()))
            else:
                runs.append(Run(f"E{e}-bias", e, "bias", _moe(dense, e, top_k, width, use_selection_bias=True),
                                LossWeights(load_balancing=0.0, selection_bias_rate=bias_rate)))
    return runs


def _batch_dict(batch: data.Batch) -> dict:
    return {k: jnp.asarray(v) for k, v in batch._asdict().items()}


def expert_load(graphdef, state, batches: list[data.Batch]) -> np.ndarray:
    """[MoE layers, E] tokens routed to each expert over ``batches`` (top-k choices counted)."""

    @jax.jit
    def counts(state, batch):
        model = nnx.merge(graphdef, state.params, state.others)
        return model(batch["tokens"], segment_ids=batch["segment_ids"]).aux["expert_counts"]

    return sum(np.asarray(counts(state, _batch_dict(b)), np.int64) for b in batches)


def train_run(run: Run, *, steps: int, batch_size: int, seq_len: int, lr: float, warmup: int, eval_every: int,
              val_batches: list[data.Batch], seed: int = 0, on_eval=None) -> dict:
    """Trains ``run.config`` from scratch with the trainer's step on the embedded corpus. Returns
    {"history": [(step, train_loss, val_loss, expert_load_max, seconds)], "expert_counts": [L, E]
    over val_batches or None}; ``on_eval(step, train_loss, val_loss, load, seconds)`` after each evaluation."""
    schedule = optimizer.learning_rate_schedule(lr, warmup, steps)
    tx = optimizer.adamw(schedule)
    graphdef, state = init_state(LM(run.config, rngs=nnx.Rngs(seed)), tx)
    train = jax.jit(make_train_step(graphdef, tx, schedule, run.weights, 1, run.config.use_selection_bias),
                    donate_argnums=(0,))
    evaluate = jax.jit(make_eval_step(graphdef, run.weights))
    stream = data.build("default", "byte", seq_len=seq_len, batch_size=batch_size, seed=seed)
    history, losses, loads = [], [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        state, metrics = train(state, _batch_dict(next(stream)), jnp.int32(step - 1))
        losses.append(metrics["loss"])
        if "expert_load_max" in metrics:
            loads.append(metrics["expert_load_max"])
        if step % eval_every == 0 or step == steps:
            sums = jax.device_get([evaluate(state, _batch_dict(b)) for b in val_batches])
            val = sum(float(n) for n, _ in sums) / sum(float(c) for _, c in sums)
            window = slice(-eval_every, None)
            train_loss = float(np.mean(jax.device_get(losses[window])))
            load = float(np.mean(jax.device_get(loads[window]))) if loads else None
            seconds = time.perf_counter() - start
            history.append((step, train_loss, val, load, seconds))
            if on_eval:
                on_eval(step, train_loss, val, load, seconds)
            losses, loads = [], []
    counts = expert_load(graphdef, state, val_batches) if run.n_experts else None
    return dict(history=history, expert_counts=counts)


def run_all(runs: list[Run], *, steps: int, batch_size: int, seq_len: int, lr: float, warmup: int, eval_every: int,
            eval_batches: int, csv_path: pathlib.Path | None, seed: int = 0) -> list[dict]:
    """Trains every run in turn; rows (keys FIELDS) are printed and written as they come."""
    val_batches = data.validation_batches("default", "byte", seq_len=seq_len, batch_size=batch_size,
                                          num_batches=eval_batches, seed=seed)
    with reporting.RowWriter(csv_path, FIELDS) as out:
        for run in runs:
            c = run.config
            base = dict(run=run.label, n_experts=run.n_experts, variant=run.variant,
                        d_ff=c.resolved_d_expert if run.n_experts else c.d_ff, params_total=count_params(c),
                        params_active=active_params(c), train_flops_per_token=flops_per_token(c, seq_len))
            print(f"== {run.label}: {base['params_total']:,} parameters, {base['params_active']:,} active, "
                  f"{base['train_flops_per_token'] / 1e6:.3f} MFLOP/token (training); load {os.getloadavg()[0]:.1f}",
                  flush=True)

            def on_eval(step, train_loss, val, load, seconds, base=base):
                row = dict(base, step=step, tokens=step * batch_size * seq_len, train_loss=train_loss, val_loss=val,
                           expert_load_max="" if load is None else load, seconds=seconds, expert_counts="")
                out.add(row)
                extra = "" if load is None else f", busiest expert {load:.2f}x the mean"
                print(f"  step {step:5d}: train {train_loss:.4f}, validation {val:.4f} nats/byte{extra} "
                      f"({seconds:.0f} s)", flush=True)

            result = train_run(run, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup,
                               eval_every=eval_every, val_batches=val_batches, seed=seed, on_eval=on_eval)
            if result["expert_counts"] is not None:  # the final row again, now with the counts
                out.rows[-1]["expert_counts"] = json.dumps(result["expert_counts"].tolist())
                out.write_again()
    return out.rows


def read_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a CSV written by ``run_all``, numbers parsed, one row per (run, step)."""
    floats = {"train_loss", "val_loss", "expert_load_max", "seconds", "train_flops_per_token"}
    ints = {"n_experts", "d_ff", "params_total", "params_active", "step", "tokens"}
    by_key = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            row = {k: (float(v) if k in floats and v != "" else int(v) if k in ints else v) for k, v in r.items()}
            row["expert_load_max"] = row["expert_load_max"] if row["expert_load_max"] != "" else None
            row["expert_counts"] = np.asarray(json.loads(row["expert_counts"])) if row["expert_counts"] else None
            by_key[(row["run"], row["step"])] = row
    return list(by_key.values())


def final_rows(rows: list[dict]) -> list[dict]:
    """The last evaluation of each run, in run order."""
    last = {}
    for r in rows:
        if r["run"] not in last or r["step"] > last[r["run"]]["step"]:
            last[r["run"]] = r
    return list(last.values())


def load_summary(counts: np.ndarray) -> dict[str, float]:
    """Expert counts [L, E] -> {"max_over_mean": busiest expert over the mean, averaged over
    layers, "cv": coefficient of variation of the loads, averaged, "idle": experts with < 10% of
    the mean load, summed over layers}."""
    counts = np.asarray(counts, np.float64)
    mean = counts.mean(-1, keepdims=True)
    return dict(max_over_mean=float((counts.max(-1) / mean[:, 0]).mean()),
                cv=float((counts.std(-1) / mean[:, 0]).mean()), idle=int((counts < 0.1 * mean).sum()))


def plot_expert_load(finals: list[dict], ax) -> None:
    """Each run's final expert loads over their mean, every layer, experts sorted busiest first, on
    a normalised rank axis (so that every E spans [0, 1])."""
    for r in finals:
        if r["expert_counts"] is None:
            continue
        counts = np.asarray(r["expert_counts"], np.float64)
        e = counts.shape[-1]
        rank = (np.arange(e) + 0.5) / e
        for i, layer in enumerate(counts):
            ax.plot(rank, np.sort(layer)[::-1] / layer.mean(), color=E_COLORS.get(e, "gray"),
                    ls=VARIANT_STYLES[r["variant"]], lw=1.2, alpha=0.8, label=r["run"] if i == 0 else None)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("expert rank / E (busiest first), each layer a line")
    ax.set_ylabel("tokens routed / mean")
    ax.set_title("expert load at the end (validation batches)")
    ax.grid(True, alpha=0.3)


def plot(rows: list[dict], path: pathlib.Path | None = None):
    """Validation loss against steps; final loss against total parameters; final expert load."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_p, ax_e) = plt.subplots(1, 3, figsize=(18, 5.5))
    finals = final_rows(rows)
    for run in dict.fromkeys(r["run"] for r in rows):
        rs = sorted((r for r in rows if r["run"] == run), key=lambda r: r["step"])
        color, ls = E_COLORS.get(rs[0]["n_experts"], "gray"), VARIANT_STYLES[rs[0]["variant"]]
        ax_l.plot([r["step"] for r in rs], [r["val_loss"] for r in rs], color=color, ls=ls, marker="o", ms=3)
    for variant in ("loss", "bias"):
        pts = sorted((r for r in finals if r["variant"] in (variant, "dense")), key=lambda r: r["params_total"])
        if len(pts) > 1:
            ax_p.plot([r["params_total"] for r in pts], [r["val_loss"] for r in pts], color="gray",
                      ls=VARIANT_STYLES[variant], lw=1)
        for r in pts:
            ax_p.plot([r["params_total"]], [r["val_loss"]], ls="none", marker="o", ms=7,
                      color=E_COLORS.get(r["n_experts"], "gray"), mfc="none" if r["variant"] == "bias" else None)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("validation loss, nats/byte")
    ax_l.set_title("validation loss (equal tokens, equal active FLOPs)")
    ax_p.set_xscale("log")
    ticks = sorted({r["params_total"] for r in finals})
    ax_p.set_xticks(ticks, [f"{t / 1e6:.1f}M" for t in ticks], minor=False)
    ax_p.set_xticks([], minor=True)
    ax_p.set_xlabel("total parameters (all experts)")
    ax_p.set_ylabel("final validation loss, nats/byte")
    ax_p.set_title("final loss against total parameters at fixed FLOPs/token")
    for ax in (ax_l, ax_p):
        ax.grid(True, which="both", alpha=0.3)
    plot_expert_load(finals, ax_e)
    es = sorted({r["n_experts"] for r in rows})
    variants = [v for v in ("dense", "loss", "bias") if any(r["variant"] == v for r in rows)]
    ax_l.legend([reporting.line(E_COLORS.get(e, "gray")) for e in es]
                + [reporting.line(ls=VARIANT_STYLES[v]) for v in variants if v != "dense"],
                ["dense" if e == 0 else f"E={e}, top-2" for e in es]
                + [{"loss": "balancing loss", "bias": "aux-loss-free bias"}[v] for v in variants if v != "dense"],
                fontsize=8, loc="upper right")
    ax_p.legend([reporting.point(), reporting.point(filled=False)],
                ["balancing loss (dense: filled)", "aux-loss-free bias"], fontsize=8, loc="upper right")
    return reporting.finish(fig, "MoE at fixed active compute: transformer tiny, every SwiGLU → E experts, top-2", path)


def report(rows: list[dict]) -> None:
    """Prints the final table: parameters, FLOPs, losses, expert load."""
    finals = final_rows(rows)
    dense = next((r for r in finals if r["variant"] == "dense"), None)
    print("\n| run | expert width | params total | params active | train MFLOP/token | val loss | vs dense "
          "| busiest/mean | load CV | idle experts |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in finals:
        vs = "" if dense is None else f"{r['val_loss'] - dense['val_loss']:+.4f}"
        if r["expert_counts"] is not None:
            s = load_summary(r["expert_counts"])
            load = f"{s['max_over_mean']:.2f} | {s['cv']:.2f} | {s['idle']}"
        else:
            load = "— | — | —"
        print(f"| {r['run']} | {r['d_ff']} | {r['params_total']:,} | {r['params_active']:,} | "
              f"{r['train_flops_per_token'] / 1e6:.3f} | {r['val_loss']:.4f} | {vs} | {load} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--bias-experts", type=int, nargs="*", default=[8, 32],
                   help="the E that also train the auxiliary-loss-free bias variant")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--bias-rate", type=float, default=1e-3, help="the selection-bias step of the bias variant")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="OUT.csv and OUT.png (default experiments/moe_scaling; with --quick, in the temp dir)")
    p.add_argument("--quick", action="store_true", help="E=4, 6 steps of 2 x 64 bytes: the pipeline, no claim")
    p.add_argument("--plot-only", action="store_true", help="tables and plot from OUT.csv, training nothing")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = pathlib.Path(tempfile.gettempdir()) / "moe_scaling_quick" if args.quick else HERE / "moe_scaling"
    if args.quick:
        args.experts, args.bias_experts, args.steps, args.batch_size, args.seq_len = [4], [4], 6, 2, 64
        args.warmup, args.eval_every, args.eval_batches = 1, 3, 1
    csv_path, png = args.out.with_suffix(".csv"), args.out.with_suffix(".png")
    if not args.plot_only:
        runs = model_configs(args.experts, args.bias_experts, args.seq_len, args.bias_rate, args.top_k)
        dense_flops = flops_per_token(runs[0].config, args.seq_len, training=False)
        print(f"device: {jax.devices()[0].device_kind}; {args.steps} steps of {args.batch_size} x {args.seq_len} "
              f"bytes ({args.steps * args.batch_size * args.seq_len:,} tokens) per run; load average {os.getloadavg()}")
        print("forward FLOPs per token at T = %d (jaxlm.models.flops):" % args.seq_len)
        for run in runs:
            f = flops_per_token(run.config, args.seq_len, training=False)
            width = run.config.resolved_d_expert if run.n_experts else run.config.d_ff
            print(f"  {run.label:9s} width {width:4d}: {f:,.0f} ({(f / dense_flops - 1) * 100:+.2f}% of dense), "
                  f"{count_params(run.config):,} parameters, {active_params(run.config):,} active", flush=True)
        start = time.perf_counter()
        run_all(runs, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                warmup=args.warmup, eval_every=args.eval_every, eval_batches=args.eval_batches, csv_path=csv_path,
                seed=args.seed)
        print(f"trained in {time.perf_counter() - start:.0f} s; load average {os.getloadavg()}")
    reporting.report_and_plot(csv_path, png, read_rows, report, plot)


if __name__ == "__main__":
    main()
