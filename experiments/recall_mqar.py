"""Associative recall (Zoology's MQAR) against model width, per mixer: does a fixed-size state
lose recall, and do a few softmax layers win it back?

  python experiments/recall_mqar.py [--quick] [--lengths 64:4 128:8 256:16] [--d-models 64 128]
      [--mixers attention linear_attention mamba2 gla deltanet gated_deltanet gdn_attention gdn_swa]
      [--lrs 1e-3 3e-3 1e-2] [--steps N] [--tokens-per-step 2048] [--vocab-size V] [--vmap]
      [--prune-at STEP] [--stop-at ACC] [--workers N] [--vmap-check] [--out experiments/recall_mqar.csv]

For each (L, key-value pairs), d_model and mixer (``experiments.recall.MIXERS``) a 2-layer model
without feed-forward layers (as Zoology's) trains on ``jaxlm.data.mqar`` for a fixed budget of
``--steps`` steps at the learning rates of ``--lrs``, and the script reports the best rate's
accuracy on held-out rows, as Zoology does. To fit the 2-core machine the sweep is a successive
halving: every rate trains to ``--prune-at`` (a quarter of the budget) on the full budget's
schedule, and only the rate of lowest validation loss there trains on to the end (its run is
the one it would have been unpruned; ``--prune-at 0`` trains every rate to the end). A run ends
early at an evaluation where it has reached ``--stop-at`` accuracy. Each step holds
``--tokens-per-step`` tokens (batch = tokens / L), so every setting sees the same number of
answers per step (tokens / L · pairs = tokens / 16 with Zoology's pairs = L / 16). ``--vmap``
trains the rates together in one vmapped program instead of one after another through one
compiled step; ``--vmap-check`` times both first (recall_mqar_vmap.csv); ``--workers`` runs
sweeps in parallel processes. Writes the CSV (one row per rate: ``best`` marks the reported one,
``pruned`` those stopped at the prune step) and a plot beside it: best accuracy against d_model,
one panel per L.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax

from experiments import recall

HERE = pathlib.Path(__file__).resolve().parent
LENGTHS = [(64, 4), (128, 8), (256, 16)]
D_MODELS = [64, 128]
LRS = [1e-3, 3e-3, 1e-2]
QUICK = dict(lengths=[(32, 2)], d_models=[32], mixers=["attention", "gdn_attention"], steps=4, prune_at=2,
             tokens_per_step=128, vocab_size=32, eval_examples=16, workers=1, stop_at=1.0)
FIELDS = [
    "seq_len", "num_kv_pairs", "d_model", "mixer", "layer_pattern", "lr", "best", "pruned", "accuracy",
    "val_loss", "steps", "budget", "batch_size", "vocab_size", "final_loss", "n_params", "state_elements",
    "ms_per_step", "compile_s", "vmapped", "history",
]
# One colour per mixer, one line style per variant: the hybrids share Gated DeltaNet's colour.
STYLE = {
    "attention": ("C0", "-", "o"),
    "linear_attention": ("C1", "-", "s"),
    "mamba2": ("C2", "-", "^"),
    "gla": ("C4", "-", "v"),
    "deltanet": ("C5", "-", "D"),
    "gated_deltanet": ("C3", "-", "P"),
    "gdn_attention": ("C3", "--", "X"),
    "gdn_swa": ("C3", ":", "*"),
}
LABELS = {
    "attention": "softmax attention", "linear_attention": "linear attention", "mamba2": "Mamba-2", "gla": "GLA",
    "deltanet": "DeltaNet", "gated_deltanet": "Gated DeltaNet", "gdn_attention": "GDN + attention (1:1)",
    "gdn_swa": f"GDN + sliding window {recall.SWA_WINDOW} (1:1)",
}


def parse_length(text: str) -> tuple[int, int]:
    try:
        seq_len, pairs = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SEQ_LEN:PAIRS such as 128:8, got {text!r}") from None
    return seq_len, pairs


def rows_of(result: recall.SweepResult, mixer: str, state_elements: int) -> list[dict]:
    best = result.best()
    return [
        dict(
            seq_len=result.task.seq_len, num_kv_pairs=result.task.num_kv_pairs, d_model=result.config.d_model,
            mixer=mixer, layer_pattern=result.config.layer_pattern, lr=run.lr, best=int(run is best),
            pruned=int(run.pruned), accuracy=round(run.accuracy, 4), val_loss=round(run.val_loss, 4), steps=run.steps, budget=result.budget, batch_size=result.batch_size,
            vocab_size=result.task.vocab_size, final_loss=round(run.loss, 4), n_params=result.n_params,
            state_elements=state_elements, ms_per_step=round(result.seconds_per_step * 1e3, 2),
            compile_s=round(result.compile_s, 2), vmapped=int(result.vmapped),
            history=" ".join(f"{s}:{a:.4f}:{v:.4f}" for s, a, v in run.history),
        )
        for run in result.runs
    ]


@dataclass(frozen=True)
class Job:
    """One sweep of the grid: a mixer at one (L, pairs) and width, every rate."""

    seq_len: int
    num_kv_pairs: int
    d_model: int
    mixer: str
    vocab_size: int
    batch_size: int
    lrs: tuple[float, ...]
    steps: int
    vmap: bool
    eval_every: int
    eval_examples: int
    stop_at: float | None
    prune_at: int | None
    seed: int


def run_job(job: Job) -> list[dict]:
    """Trains one sweep and returns its CSV rows (a module-level function: worker processes run it)."""
    config = recall.mqar_config(job.mixer, d_model=job.d_model, vocab_size=job.vocab_size)
    task = recall.Task(job.seq_len, job.num_kv_pairs, job.vocab_size)
    name = f"[L={job.seq_len} d={job.d_model} {job.mixer}]"
    print(f"{name} {config.layer_pattern}, batch {job.batch_size}, {job.steps} steps", flush=True)
    result = recall.train_sweep(
        config, task, lrs=job.lrs, steps=job.steps, batch_size=job.batch_size, vmap=job.vmap,
        eval_every=job.eval_every, eval_examples=job.eval_examples, stop_at=job.stop_at, prune_at=job.prune_at,
        seed=job.seed, log=lambda line: print(f"{name}{line}", flush=True),
    )
    return rows_of(result, job.mixer, recall.recurrent_state_elements(config))


def _ordered(rows: list[dict], jobs: list[Job]) -> list[dict]:
    """Rows in the grid's order (L, d_model, mixer), whatever order the workers finished in."""
    rank = {(j.seq_len, j.d_model, j.mixer): i for i, j in enumerate(jobs)}
    return sorted(rows, key=lambda r: (rank[(r["seq_len"], r["d_model"], r["mixer"])], r["lr"]))


def vmap_check(args, out: pathlib.Path) -> None:
    """Seconds per (rate, step) of the vmapped sweep and of the one-after-another sweep, side by
    side for every mixer at the first length and width (``--vmap-check-steps`` steps each)."""
    seq_len, pairs = args.lengths[0]
    task = recall.Task(seq_len, pairs, args.vocab_size)
    rows = []
    for mixer in args.mixers:
        config = recall.mqar_config(mixer, d_model=args.d_models[0], vocab_size=args.vocab_size)
        times = {}
        for vmapped in (False, True):
            r = recall.train_sweep(config, task, lrs=args.lrs, steps=args.vmap_check_steps,
                                   batch_size=max(1, args.tokens_per_step // seq_len), vmap=vmapped,
                                   eval_examples=args.eval_examples, seed=args.seed, log=None)
            times[vmapped] = r.seconds_per_step
        rows.append(dict(mixer=mixer, seq_len=seq_len, d_model=args.d_models[0], n_lrs=len(args.lrs),
                         sequential_ms=round(times[False] * 1e3, 2), vmapped_ms=round(times[True] * 1e3, 2),
                         vmapped_over_sequential=round(times[True] / times[False], 3)))
        print(f"[vmap check] {mixer:17s} per rate and step: one after another {times[False] * 1e3:7.1f} ms, "
              f"vmapped {times[True] * 1e3:7.1f} ms ({times[True] / times[False]:.2f}x)", flush=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a seconds-long end-to-end check of the pipeline (no science)")
    p.add_argument("--lengths", type=parse_length, nargs="+", default=LENGTHS, help="SEQ_LEN:PAIRS settings")
    p.add_argument("--d-models", type=int, nargs="+", default=D_MODELS)
    p.add_argument("--mixers", nargs="+", default=list(recall.MIXERS), choices=list(recall.MIXERS))
    p.add_argument("--lrs", type=float, nargs="+", default=LRS)
    p.add_argument("--steps", type=int, default=1000, help="the fixed step budget of every run")
    p.add_argument("--tokens-per-step", type=int, default=2048, help="batch = this / seq_len rows")
    p.add_argument("--vocab-size", type=int, default=128)
    p.add_argument("--eval-examples", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=None, help="default: a fifth of --steps")
    p.add_argument("--stop-at", type=float, default=0.99,
                   help="end a run early at an evaluation where it has reached this accuracy (1 or more: never)")
    p.add_argument("--prune-at", type=int, default=None,
                   help="successive halving: at this step only the rate of lowest validation loss goes on "
                        "(default a quarter of --steps; 0: every rate runs the whole budget)")
    p.add_argument("--vmap", action="store_true", help="train the rates together in one vmapped program (no pruning)")
    p.add_argument("--workers", type=int, default=1, help="sweeps run in this many processes at once")
    p.add_argument("--vmap-check", action="store_true", help="first time vmapped against one-after-another")
    p.add_argument("--vmap-check-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=HERE / "recall_mqar.csv", help="CSV; the plot goes beside it")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if len(args.lrs) < 1 or args.steps < 2 or args.tokens_per_step < 1 or args.workers < 1:
        p.error("need at least one --lrs, --steps >= 2, --tokens-per-step >= 1 and --workers >= 1")
    args.lrs = tuple(args.lrs)
    eval_every = args.eval_every or max(1, args.steps // 5)
    stop_at = args.stop_at if args.stop_at < 1 else None
    prune_at = None if args.vmap or args.prune_at == 0 else (args.prune_at or args.steps // 4)
    t_start = time.perf_counter()
    print(f"device: {jax.devices()[0].device_kind}; lengths {args.lengths}, d_model {args.d_models}, "
          f"{len(args.mixers)} mixers, lrs {args.lrs}, {args.steps} steps of {args.tokens_per_step} tokens, "
          f"V={args.vocab_size}; load average {os.getloadavg()[0]:.1f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.vmap_check:
        vmap_check(args, args.out.with_name(args.out.stem + "_vmap.csv"))

    jobs = [Job(seq_len, pairs, d_model, mixer, args.vocab_size, max(1, args.tokens_per_step // seq_len), args.lrs,
                args.steps, args.vmap, eval_every, args.eval_examples, stop_at, prune_at, args.seed)
            for seq_len, pairs in args.lengths for d_model in args.d_models for mixer in args.mixers]
    rows: list[dict] = []

    def collect(job_rows: list[dict]) -> None:
        rows.extend(job_rows)
        _write_csv(_ordered(rows, jobs), args.out)  # after every sweep, so that a long run leaves partial results
        best = next(r for r in job_rows if r["best"])
        print(f"  -> L={best['seq_len']} d={best['d_model']} {best['mixer']}: best accuracy {best['accuracy']:.3f} "
              f"at lr {best['lr']:g} ({best['steps']} steps); {best['ms_per_step']:.1f} ms/step, compile "
              f"{best['compile_s']:.1f} s; {len(rows) // len(args.lrs)}/{len(jobs)} sweeps after "
              f"{time.perf_counter() - t_start:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)

    if args.workers == 1:
        for job in jobs:
            collect(run_job(job))
    else:
        # Processes, not threads: one XLA:CPU step of these small models keeps about one core busy.
        # Largest sweeps first, so that the last ones to finish are short.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        order = sorted(jobs, key=lambda j: -j.seq_len * j.d_model)
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in as_completed([pool.submit(run_job, job) for job in order]):
                collect(done.result())
    rows = _ordered(rows, jobs)
    _table(rows)
    _plot(rows, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}; total {time.perf_counter() - t_start:.0f} s")


def _write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _best_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["best"]]


def _table(rows: list[dict]) -> None:
    best = _best_rows(rows)
    settings = sorted({(r["seq_len"], r["num_kv_pairs"], r["d_model"]) for r in best})
    head = " | ".join(f"L={s} ({k} pairs) d={d}" for s, k, d in settings)
    print(f"\n| best accuracy (lr) | {head} |\n|---|" + "---|" * len(settings))
    for mixer in dict.fromkeys(r["mixer"] for r in best):
        cells = []
        for setting in settings:
            r = next((r for r in best if (r["seq_len"], r["num_kv_pairs"], r["d_model"]) == setting
                      and r["mixer"] == mixer), None)
            cells.append("—" if r is None else f"{r['accuracy']:.3f} ({r['lr']:g})")
        print(f"| {mixer} | " + " | ".join(cells) + " |")


def _plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best_rows(rows)
    lengths = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in best})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 4.4), squeeze=False, sharey=True)
    for ax, (seq_len, pairs) in zip(axes[0], lengths):
        for mixer in dict.fromkeys(r["mixer"] for r in best):
            rs = sorted((r for r in best if (r["seq_len"], r["num_kv_pairs"], r["mixer"]) == (seq_len, pairs, mixer)),
                        key=lambda r: r["d_model"])
            colour, style, marker = STYLE[mixer]
            ax.plot([r["d_model"] for r in rs], [r["accuracy"] for r in rs], linestyle=style, marker=marker,
                    color=colour, label=LABELS[mixer])
        budget = {(r["budget"], r["batch_size"]) for r in best if r["seq_len"] == seq_len}
        ax.set_title(f"L = {seq_len}, {pairs} pairs" + "".join(f"\n{s} steps x {b} rows" for s, b in sorted(budget)))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["d_model"] for r in best}), [str(d) for d in sorted({r["d_model"] for r in best})])
        ax.set_xlabel("d_model")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (best learning rate)")
    axes[0][-1].legend(fontsize=8, loc="best")
    vocab = sorted({r["vocab_size"] for r in best})
    fig.suptitle(f"MQAR recall, 2-layer models, vocabulary {', '.join(map(str, vocab))}, on {jax.devices()[0].device_kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
