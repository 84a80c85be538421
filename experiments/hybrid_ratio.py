"""The quality/cost trade-off of hybrids: Gated DeltaNet with softmax attention at 7:1, 3:1 and
1:1, against pure Gated DeltaNet, pure attention and GDN with sliding-window attention.

  python experiments/hybrid_ratio.py [--quick] [--models gdn gdn_attn_7to1 ...] [--steps 400]
      [--batch-size 8] [--seq-len 256] [--mqar 64:4] [--mqar-steps 600] [--mqar-lrs 1e-3 3e-3 1e-2]
      [--workers 2] [--out experiments/hybrid_ratio.csv]

Every model is ``preset("gated_deltanet", "tiny")`` (d_model 128, byte vocabulary) at 8 layers,
each a mixer and a SwiGLU, with the layer pattern of MODELS; its feed-forward width ``d_ff`` is
solved so that every model has the parameter count of pure Gated DeltaNet (within 0.5%). One
table, one row per model:

- validation loss in nats/byte: ``python -m jaxlm.train --data default`` (the embedded corpus,
  byte tokenizer), the same ``--steps`` × ``--batch-size`` × ``--seq-len`` tokens, learning
  rate and schedule for every model (``jaxlm.training.loop.train``, run in-process);
- MQAR accuracy: the same layer stack, with an embedding of ``--mqar-vocab-size`` ids, trained
  on ``jaxlm.data.mqar`` with the harness of ``experiments/recall_mqar.py``
  (``experiments.recall.train_sweep``, its successive halving over ``--mqar-lrs`` included);
- training tokens/s: the trainer's jitted step for every model, timed in interleaved rounds
  side by side after the training jobs (``experiments/bench_train.py``'s cases and rounds);
- decode cache bytes at 4K and 32K and the decode step time at 4K, batch 1: the compiled decode
  step and synthetic caches of ``experiments/bench_decode.py``, timed in interleaved rounds.

The training jobs (language model and MQAR) run in ``--workers`` processes; the timings run
afterwards in this process alone. Writes the CSV and a plot beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import bench_decode, bench_train, recall, recall_mqar
from jaxlm import sharding
from jaxlm.models import LM, count_params, preset
from jaxlm.training import loop
from jaxlm.training.args import parse_args
from jaxlm.training.metrics import read_metrics

HERE = pathlib.Path(__file__).resolve().parent
BASE = ("gated_deltanet", "tiny")  # the preset whose widths, heads and vocabulary every model shares
MODELS = {
    "gdn": "G",
    "gdn_attn_7to1": "GGGGGGGA",  # MiniMax-01's ratio
    "gdn_attn_3to1": "GGGA",  # Qwen3-Next's
    "gdn_attn_1to1": "GA",
    "attention": "A",
    "gdn_swa": "GW",  # Gated DeltaNet-H1: GDN and sliding-window attention
}
N_LAYERS = 8
WINDOW = 32
PARAM_TOLERANCE = 0.005
DECODE_CONTEXTS = (4096, 32768)  # cache bytes at both; the step is timed at the first
# Quick: a 2-layer, 32-wide version of the 1:1 hybrid (both mixers), a few steps of everything.
QUICK = dict(models=["gdn_attn_1to1"], steps=3, batch_size=8, seq_len=32, eval_batches=1,
             mqar=(16, 2), mqar_steps=2, mqar_lrs=[3e-3], mqar_vocab_size=16, mqar_eval_examples=8,
             decode_contexts=(64, 128),
             timing_rounds=2, decode_min_seconds=0.0, workers=1)
QUICK_OVERRIDES = dict(n_layers=2, d_model=32, n_heads=2, linear_n_heads=1, linear_head_dim=16,
                       linear_head_v_dim=32, window=8)
FIELDS = [
    "model", "layer_pattern", "n_params", "d_ff", "train_tokens", "val_loss_nats_per_byte", "mqar_accuracy",
    "mqar_lr", "mqar_setting", "train_tokens_per_s", "train_tokens_per_s_median", "trainer_log_tokens_per_s",
    "decode_cache_bytes_4k", "decode_cache_bytes_32k", "decode_step_ms_4k", "decode_step_ms_4k_median",
    "val_history",
]
STYLE = {  # one colour per model; pure models solid, attention hybrids dashed, the window hybrid dotted
    "gdn": ("C3", "-", "P"), "gdn_attn_7to1": ("C1", "--", "s"), "gdn_attn_3to1": ("C2", "--", "^"),
    "gdn_attn_1to1": ("C4", "--", "v"), "attention": ("C0", "-", "o"), "gdn_swa": ("C5", ":", "*"),
}


def model_overrides(name: str, extra: dict) -> dict:
    """ModelConfig fields over the base preset for model ``name`` (d_ff not yet solved)."""
    return {"layer_pattern": MODELS[name], "n_layers": N_LAYERS, "window": WINDOW, **extra}


def equal_param_d_ff(names: list[str], extra: dict) -> dict[str, int]:
    """d_ff per model giving pure Gated DeltaNet's parameter count: the count is affine in d_ff,
    so two counts give the width (one unit of d_ff is 3·d_model·n_layers parameters)."""
    target = count_params(preset(*BASE, **model_overrides("gdn", extra)))
    widths = {}
    for name in names:
        over = model_overrides(name, extra)
        lo, hi = (count_params(preset(*BASE, **over, d_ff=f)) for f in (64, 128))
        d_ff = max(1, round(64 + (target - lo) * 64 / (hi - lo)))
        count = count_params(preset(*BASE, **over, d_ff=d_ff))
        if abs(count - target) > PARAM_TOLERANCE * target:
            raise ValueError(f"{name}: no d_ff gives {target} parameters within {PARAM_TOLERANCE:.1%} (d_ff {d_ff}: {count})")
        widths[name] = d_ff
    return widths


@dataclass(frozen=True)
class Job:
    kind: str  # "lm" or "mqar"
    name: str
    overrides: tuple  # ModelConfig overrides as sorted (field, value) pairs
    args: tuple  # the script's arguments that the job reads, as (name, value) pairs


def run_job(job: Job) -> dict:
    """One training job (a module-level function: worker processes run it)."""
    over, a = dict(job.overrides), dict(job.args)
    if job.kind == "lm":
        return {"name": job.name, **train_lm(job.name, over, a)}
    # The layer stack of the language model; the embedding is MQAR's vocabulary (the ids of
    # recall_mqar.py's default), which learns far faster than 256 ids (RESULTS.md).
    config = preset(*BASE, **{**over, "vocab_size": a["mqar_vocab_size"], "chunk_size": recall.CHUNK_SIZE})
    seq_len, pairs = a["mqar"]
    result = recall.train_sweep(
        config, recall.Task(seq_len, pairs, config.vocab_size), lrs=a["mqar_lrs"], steps=a["mqar_steps"],
        batch_size=max(1, a["mqar_tokens_per_step"] // seq_len), eval_every=max(1, a["mqar_steps"] // 4),
        eval_examples=a["mqar_eval_examples"], stop_at=0.99, prune_at=max(1, a["mqar_steps"] // 4), seed=a["seed"],
        log=lambda line: print(f"[mqar {job.name}]{line}", flush=True),
    )
    best = result.best()
    return {"name": job.name, "mqar_accuracy": round(best.accuracy, 4), "mqar_lr": best.lr,
            "mqar_setting": f"L={seq_len} pairs={pairs} V={config.vocab_size} {best.steps}/{result.budget} steps "
                            f"x {result.batch_size} rows",
            "mqar_runs": [(r.lr, r.accuracy, r.steps, r.pruned) for r in result.runs]}


def train_lm(name: str, over: dict, a: dict) -> dict:
    """``python -m jaxlm.train`` on the embedded corpus, in-process; the final validation loss."""
    run_dir = pathlib.Path(a["runs_dir"]) / name
    argv = [
        "--preset", BASE[0], "--size", BASE[1], "--data", "default", "--steps", str(a["steps"]),
        "--batch-size", str(a["batch_size"]), "--seq-len", str(a["seq_len"]), "--lr", str(a["lr"]),
        "--warmup", str(max(1, a["steps"] // 20)), "--eval-every", str(max(1, a["steps"] // 6)),
        "--eval-batches", str(a["eval_batches"]), "--checkpoint-every", str(a["steps"]), "--keep-checkpoints", "1",
        "--log-every", str(max(1, a["steps"] // 12)), "--sample-tokens", "1", "--seed", str(a["seed"]),
        "--out", str(run_dir),
    ]
    for field, value in over.items():
        argv += [f"--model.{field.replace('_', '-')}", str(value)]
    print(f"[lm {name}] python -m jaxlm.train {' '.join(argv)}", flush=True)
    loop.train(parse_args(argv))
    records = read_metrics(run_dir)
    val = [(r["step"], r["loss"]) for r in records if r["split"] == "validation"]
    logged = [r["tokens_per_second"] for r in records if r["split"] == "train" and r["step"] > a["steps"] // 12]
    print(f"[lm {name}] validation loss {val[-1][1]:.4f} nats/byte after {a['steps']} steps", flush=True)
    return {"val_loss_nats_per_byte": round(val[-1][1], 4), "train_tokens": a["steps"] * a["batch_size"] * a["seq_len"],
            "trainer_log_tokens_per_s": round(statistics.median(logged)) if logged else "",
            "val_history": " ".join(f"{s}:{v:.4f}" for s, v in val)}


def training_throughput(names: list[str], overrides: dict[str, dict], a: dict) -> dict[str, tuple[float, float]]:
    """(best, median) tokens/s of the trainer's step per model, in rotated interleaved rounds."""
    mesh = sharding.make_mesh(None)
    batch = bench_train.make_batch(a["batch_size"], a["seq_len"])
    cases = []
    for name in names:
        case = bench_train.jaxlm_case(BASE[0], BASE[1], batch, a["seq_len"], mesh, **overrides[name])
        case.preset = name
        cases.append(case)
        print(f"[tokens/s] {name}: first step {case.first_step_s:.1f} s", flush=True)
    bench_train.measure(cases, a["timing_rounds"], bench_train.matmul_probe(jax.devices()[0]))
    tokens = a["batch_size"] * a["seq_len"]
    return {c.preset: (tokens / c.best(), tokens / c.median()) for c in cases}


def decode_costs(names: list[str], overrides: dict[str, dict], a: dict) -> dict[str, dict]:
    """Cache bytes at each decode context and (best, median) ms of a compiled decode step at the
    first, batch 1, in interleaved rounds (bench_decode's synthetic caches and steps)."""
    first, *_ = a["decode_contexts"]
    tokens = jnp.ones((1, 1), jnp.int32)
    cases = {}
    for name in names:
        model = LM(preset(*BASE, **overrides[name]), rngs=nnx.Rngs(0))
        sizes = {}
        for ctx in a["decode_contexts"]:
            sizes[ctx] = sum(bench_decode.cache_bytes(bench_decode.synthetic_cache(model, ctx)))
        step = bench_decode.make_steps(model)["compiled"]
        _, cache = bench_decode.timed_steps(step, tokens, bench_decode.synthetic_cache(model, first), 2)
        cases[name] = dict(step=step, cache=cache, sizes=sizes, times=[])
    for r in range(a["timing_rounds"]):
        for name in names[r % len(names):] + names[: r % len(names)]:
            case = cases[name]
            seconds, case["cache"] = bench_decode.timed_steps(case["step"], tokens, case["cache"], 5,
                                                              a["decode_min_seconds"])
            case["times"] += seconds
        print(f"[decode] round {r + 1}/{a['timing_rounds']} (load {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{n} {min(cases[n]['times']) * 1e3:.2f} ms" for n in names), flush=True)
    return {n: dict(sizes=c["sizes"], best_ms=min(c["times"]) * 1e3, median_ms=statistics.median(c["times"]) * 1e3)
            for n, c in cases.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a seconds-long end-to-end check of the pipeline (no science)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=400, help="language-model optimizer steps, equal for every model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="the trainer's peak learning rate, every model")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--mqar", type=recall_mqar.parse_length, default=(64, 4), help="MQAR SEQ_LEN:PAIRS")
    p.add_argument("--mqar-steps", type=int, default=600)
    p.add_argument("--mqar-vocab-size", type=int, default=128)
    p.add_argument("--mqar-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--mqar-tokens-per-step", type=int, default=2048)
    p.add_argument("--mqar-eval-examples", type=int, default=512)
    p.add_argument("--decode-contexts", type=int, nargs=2, default=DECODE_CONTEXTS)
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--decode-min-seconds", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=1, help="training jobs run in this many processes at once")
    p.add_argument("--runs-dir", type=pathlib.Path, default=None, help="the trainer's run folders; default a new temp dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=HERE / "hybrid_ratio.csv", help="CSV; the plot goes beside it")
    args = p.parse_args(argv)
    extra = {}
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        extra = QUICK_OVERRIDES
    if args.steps < 2 or args.mqar_steps < 2 or args.workers < 1 or args.timing_rounds < 1:
        p.error("need --steps >= 2, --mqar-steps >= 2, --workers >= 1 and --timing-rounds >= 1")
    runs_dir = args.runs_dir or pathlib.Path(tempfile.mkdtemp(prefix="hybrid_ratio_runs_"))
    a = dict(vars(args), runs_dir=str(runs_dir), mqar_lrs=tuple(args.mqar_lrs), mqar=tuple(args.mqar),
             decode_contexts=tuple(args.decode_contexts))
    a.pop("out"), a.pop("quick"), a.pop("models")
    t_start = time.perf_counter()
    names = args.models
    d_ff = equal_param_d_ff(names, extra)
    overrides = {n: dict(model_overrides(n, extra), d_ff=d_ff[n]) for n in names}
    params = {n: count_params(preset(*BASE, **overrides[n])) for n in names}
    print(f"device: {jax.devices()[0].device_kind}; load average {os.getloadavg()[0]:.1f}; models (d_ff, params): "
          + ", ".join(f"{n} {MODELS[n]} ({d_ff[n]}, {params[n]:,})" for n in names), flush=True)

    jobs = [Job(kind, n, tuple(sorted(overrides[n].items())), tuple(sorted(a.items())))
            for kind in ("lm", "mqar") for n in names]
    results: dict[str, dict] = {n: {} for n in names}
    if args.workers == 1:
        for job in jobs:
            results[job.name].update(run_job(job))
    else:
        # The training jobs of these small models keep about one core busy each.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in as_completed([pool.submit(run_job, job) for job in jobs]):
                out = done.result()
                results[out["name"]].update(out)
                print(f"[done] {out['name']}: {json.dumps({k: v for k, v in out.items() if k != 'val_history'})} "
                      f"after {time.perf_counter() - t_start:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"training jobs done after {time.perf_counter() - t_start:.0f} s; timing side by side", flush=True)
    throughput = training_throughput(names, overrides, a)
    decode = decode_costs(names, overrides, a)

    small, large = a["decode_contexts"]
    rows = []
    for n in names:
        r = results[n]
        rows.append(dict(
            model=n, layer_pattern=MODELS[n], n_params=params[n], d_ff=d_ff[n], train_tokens=r["train_tokens"],
            val_loss_nats_per_byte=r["val_loss_nats_per_byte"], mqar_accuracy=r["mqar_accuracy"],
            mqar_lr=r["mqar_lr"], mqar_setting=r["mqar_setting"], train_tokens_per_s=round(throughput[n][0]),
            train_tokens_per_s_median=round(throughput[n][1]), trainer_log_tokens_per_s=r["trainer_log_tokens_per_s"],
            decode_cache_bytes_4k=decode[n]["sizes"][small], decode_cache_bytes_32k=decode[n]["sizes"][large],
            decode_step_ms_4k=round(decode[n]["best_ms"], 3), decode_step_ms_4k_median=round(decode[n]["median_ms"], 3),
            val_history=r["val_history"],
        ))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    _table(rows, small, large)
    _plot(rows, args.out.with_suffix(".png"), large)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}; trainer runs in {runs_dir}; "
          f"total {time.perf_counter() - t_start:.0f} s")


def _table(rows: list[dict], small: int, large: int) -> None:
    k = lambda c: f"{c // 1024}K" if c >= 1024 else str(c)
    print(f"\n| model | pattern | params | val loss (nats/byte) | MQAR acc | train tokens/s | "
          f"cache {k(small)} | cache {k(large)} | decode ms @ {k(small)} |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layer_pattern']} | {r['n_params']:,} | {r['val_loss_nats_per_byte']:.4f} | "
              f"{r['mqar_accuracy']:.3f} | {r['train_tokens_per_s']:,} | {r['decode_cache_bytes_4k'] / 2**20:.2f} MiB | "
              f"{r['decode_cache_bytes_32k'] / 2**20:.2f} MiB | {r['decode_step_ms_4k']:.2f} |")


def _plot(rows: list[dict], path: pathlib.Path, large: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_cost, ax_recall) = plt.subplots(1, 3, figsize=(16, 4.8))
    for r in rows:
        colour, style, marker = STYLE[r["model"]]
        label = f"{r['model']} ({r['layer_pattern']})"
        history = [tuple(map(float, x.split(":"))) for x in r["val_history"].split()]
        tokens_per_step = r["train_tokens"] / max(s for s, _ in history)
        ax_curve.plot([s * tokens_per_step for s, _ in history], [v for _, v in history], linestyle=style,
                      marker=marker, color=colour, label=label)
        ax_cost.scatter(r["decode_cache_bytes_32k"], r["val_loss_nats_per_byte"], color=colour, marker=marker, s=80,
                        label=label)
        ax_recall.scatter(r["decode_step_ms_4k"], r["mqar_accuracy"], color=colour, marker=marker, s=80, label=label)
    ax_curve.set(xlabel="training tokens (bytes)", ylabel="validation loss (nats/byte)", title="language modelling")
    k = f"{large // 1024}K" if large >= 1024 else str(large)
    ax_cost.set(xscale="log", xlabel=f"decode cache bytes at {k} (batch 1)", ylabel="final validation loss (nats/byte)",
                title="quality against decode memory")
    ax_recall.set(xlabel="decode step ms at 4K (batch 1)", ylabel="MQAR accuracy (best lr)",
                  title=f"recall ({rows[0]['mqar_setting']})", ylim=(-0.02, 1.02))
    for ax in (ax_curve, ax_cost, ax_recall):
        ax.grid(True, alpha=0.3)
    ax_curve.legend(fontsize=8)
    fig.suptitle(f"Hybrid ratios at {rows[0]['n_params']:,} parameters (±{PARAM_TOLERANCE:.1%}), "
                 f"{rows[0]['train_tokens']:,} training tokens, on {jax.devices()[0].device_kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
