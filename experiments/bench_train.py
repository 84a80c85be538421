"""Training throughput: tokens/s and MFU of full optimizer steps, and jaxlm against Hugging Face.

  python experiments/bench_train.py [--presets qwen3_next,transformer,gated_deltanet]
      [--sizes tiny,small] [--batch-size 8] [--seq-len 256] [--repeats 5]
      [--torch-sizes tiny] [--no-torch] [--csv experiments/bench_train.csv]
  python experiments/bench_train.py --loop-baseline REV [--loop-steps 60] [--loop-from 10] [--loop-window 10]
      [--presets qwen3_next] [--sizes tiny] [--batch-size 8] [--seq-len 256] [--repeats 3]

Each jaxlm row is one optimizer step (forward, backward, global-norm clipping, AdamW) built as
``python -m jaxlm.train`` builds it: the state placed in the shardings of ``jaxlm.sharding`` on a
1-device mesh, and ``jaxlm.training.step.jit_steps`` with its donated state, in float32.
MFU = flops_per_token(config, seq_len) · tokens/s / peak, the peak being
``peak_flops_per_second(dtype="float32")`` (on CPU: one measured 1024² matmul rate, as the
trainer logs it). The same matmul is timed again in every round; the second MFU column uses the
best rate seen over the whole run, which is steadier on a shared machine.

The reference is transformers' ``Qwen3NextForCausalLM`` in PyTorch (eager, float32) on a
``Qwen3NextConfig`` whose shapes mirror ``preset("qwen3_next", size)``; both parameter counts are
printed. Its step is zero_grad, forward with labels (cross-entropy plus the router's
load-balancing loss), backward, ``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW`` (decay on
matrices only): the work of jaxlm's step. It runs with ``torch.set_num_threads`` = the cores
this process may use, and once more with 1 thread, because PyTorch's per-op OpenMP parallelism
is very sensitive to other jobs on a small shared CPU. Without flash-linear-attention and
causal-conv1d (on CPU) transformers runs its PyTorch fallbacks: the chunked gated delta rule
(chunk 64, ``torch.linalg.solve_triangular`` for the UT transform) and a grouped conv1d.
torch and transformers are optional: without them the comparison is skipped with a message.

Timing: every case is compiled and warmed up first; then ``--repeats`` rounds each time one step
of every case, in an order rotated each round, so that the shared CPU's load hits all cases
alike. Reported: the best step (tokens/s, MFU), the median, the spread (slowest / fastest step),
and for jaxlm against torch the range of the per-round ratios.

``--loop-baseline REV`` times the whole training loop instead (``python -m jaxlm.train``: data
packing, batch placement, the step, the metrics' read-back and logging) against the same loop
with the files of LOOP_FILES as in git revision REV. Both are copies of this checkout's ``jaxlm``
(and ``kernels_pallas``) taken at the start, so only the loop files differ. Each round runs one
job of ``--loop-steps`` steps per tree, in an order rotated each round, in its own process
(``python -m jaxlm.train``'s arguments, evaluation and checkpoint only at the last step, one
persistent compilation cache for all jobs); the
job's ``MetricsLog.log`` is wrapped to record when each train step is logged. Reported per job:
the tokens/s of the steps after ``--loop-from`` (past compilation) up to the last, the steps'
tokens over the time between their log calls, and that of the fastest ``--loop-window`` steps
among the consecutive windows of that interval (steadier on a shared machine, as the best step
is above). The window ends must be steps at which both loops log (multiples of
``--log-every``), so that every interval counts whole steps in both.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import sharding
from jaxlm.models import LM, ModelConfig, count_params, preset
from jaxlm.models.flops import flops_per_token
from jaxlm.training import optimizer
from jaxlm.training.peak import PROBE_SIZE, peak_flops_per_second
from jaxlm.training.step import LossWeights, TrainState, init_state, jit_steps

DEFAULT_PRESETS = ("qwen3_next", "transformer", "gated_deltanet")
DEFAULT_SIZES = ("tiny", "small")
LR, WARMUP, SCHEDULE_STEPS = 3e-3, 15, 150  # the trainer's defaults; the rate does not change the work
WEIGHT_DECAY, BETAS, CLIP_NORM = 0.1, (0.9, 0.95), 1.0
LOAD_BALANCING = LossWeights().load_balancing
CSV_FIELDS = (
    "framework", "preset", "size", "threads", "params", "batch_size", "seq_len", "flops_per_token", "best_s",
    "median_s", "spread", "tokens_per_s", "tokens_per_s_median", "mfu", "mfu_best_probe", "first_step_s",
    "peak_flops", "best_probe_flops", "device",
)


@dataclass
class Case:
    """One timed training step: ``run()`` performs a step and returns when its results exist."""

    framework: str
    preset: str
    size: str
    params: int
    flops_per_token: float
    run: Callable[[], None]
    threads: int | None = None  # torch's intra-op threads; None: the framework's default (jaxlm)
    first_step_s: float = 0.0
    times: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        threads = f" ({self.threads} thread{'s' * (self.threads != 1)})" if self.threads else ""
        return f"{self.framework}{threads} {self.preset}-{self.size}"

    def best(self) -> float:
        return min(self.times)

    def median(self) -> float:
        return statistics.median(self.times)

    def spread(self) -> float:
        return max(self.times) / min(self.times)


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def make_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random byte tokens, one document per row, every target counted (no packing)."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, 256, (batch_size, seq_len + 1), dtype=np.int32)
    return dict(
        tokens=stream[:, :-1], targets=stream[:, 1:],
        segment_ids=np.zeros((batch_size, seq_len), np.int32), loss_mask=np.ones((batch_size, seq_len), np.float32),
    )


def timed_first_call(run: Callable[[], None]) -> float:
    """Seconds of the first call (compilation included); one more call then warms up."""
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    run()
    return seconds


def matmul_probe(device: jax.Device) -> Callable[[], float]:
    """A function returning the FLOP/s of the best of 3 jitted n×n float32 matmuls, n as in
    jaxlm.training.peak's probe, so that the peak can be re-measured in every round."""
    n = PROBE_SIZE.get(device.platform, 2048)
    keys = jax.random.split(jax.random.key(1))
    a, b = (jax.device_put(jax.random.normal(k, (n, n), jnp.float32), device) for k in keys)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()

    def probe() -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = min(best, time.perf_counter() - start)
        return 2.0 * n**3 / best

    return probe


def jaxlm_case(name: str, size: str, batch: dict[str, np.ndarray], seq_len: int, mesh: jax.sharding.Mesh,
               **overrides: Any) -> Case:
    """The trainer's jitted step for preset ``name`` at ``size`` on ``mesh`` (float32);
    ``overrides`` replace ModelConfig fields (for ablations when profiling)."""
    config = preset(name, size, dtype="float32", **overrides)
    schedule = optimizer.learning_rate_schedule(LR, WARMUP, SCHEDULE_STEPS)
    tx = optimizer.adamw(schedule, weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], clip_norm=CLIP_NORM)
    with jax.set_mesh(mesh):
        # The shardings are derived as jaxlm.training.loop._initial_state derives them. The state
        # itself is built eagerly and placed, where the trainer jits its creation: that compile
        # costs 15-30 s per case here and changes nothing in the step.
        graphdef, state = init_state(LM(config, rngs=nnx.Rngs(0)), tx)
        shardings = TrainState(*(sharding.state_shardings(part, mesh) for part in state))
        state = jax.device_put(state, shardings)
        train_step, _ = jit_steps(graphdef, shardings, tx, schedule, LossWeights(), grad_accum=1,
                                  use_selection_bias=config.use_selection_bias, mesh=mesh)
        device_batch = {k: sharding.global_batch(v, mesh) for k, v in batch.items()}
    holder = {"state": state, "step": 0}

    def run() -> None:
        with jax.set_mesh(mesh):
            new_state, metrics = train_step(holder["state"], device_batch, jnp.int32(holder["step"]))
        jax.block_until_ready((new_state, metrics))
        holder["state"], holder["step"] = new_state, holder["step"] + 1  # the old state was donated

    n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    case = Case("jaxlm", name, size, n_params, flops_per_token(config, seq_len), run)
    case.first_step_s = timed_first_call(run)
    return case


def hf_qwen3_next_config(config: ModelConfig) -> Any:
    """A transformers Qwen3NextConfig with the shapes of a jaxlm qwen3_next config."""
    from transformers import Qwen3NextConfig

    kinds = config.layer_kinds()
    if {m for m, _ in kinds} - {"G", "A"} or {f for _, f in kinds} != {"E"} or config.n_shared_experts != 1:
        raise ValueError(
            "the Hugging Face reference needs Gated DeltaNet / attention layers, all MoE with one shared expert"
        )
    head_dim = config.resolved_head_dim
    k_dim, v_dim = config.linear_head_dims("G")
    return Qwen3NextConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layers,
        layer_types=["linear_attention" if m == "G" else "full_attention" for m, _ in kinds],
        num_attention_heads=config.n_heads, num_key_value_heads=config.resolved_n_kv_heads, head_dim=head_dim,
        partial_rotary_factor=config.resolved_rotary_dim / head_dim, rope_theta=config.rope_theta,
        linear_num_key_heads=config.resolved_linear_n_heads, linear_key_head_dim=k_dim,
        linear_num_value_heads=config.resolved_linear_n_v_heads, linear_value_head_dim=v_dim,
        linear_conv_kernel_dim=config.conv_size, intermediate_size=config.d_ff,
        num_experts=config.n_experts, num_experts_per_tok=config.top_k, moe_intermediate_size=config.resolved_d_expert,
        shared_expert_intermediate_size=config.resolved_shared_d_ff, norm_topk_prob=config.renormalize,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=config.tie_embeddings,
        rms_norm_eps=config.norm_eps, output_router_logits=True, router_aux_loss_coef=LOAD_BALANCING,
        use_cache=False,
    )


def torch_cases(size: str, batch: dict[str, np.ndarray], seq_len: int, thread_counts: list[int]) -> list[Case]:
    """transformers' Qwen3NextForCausalLM training step, mirroring preset("qwen3_next", size),
    one case per torch thread count (one model and optimizer, shared)."""
    import torch
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(0)
    config = preset("qwen3_next", size, dtype="float32")
    model = Qwen3NextForCausalLM(hf_qwen3_next_config(config)).float().train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    tokens = torch.from_numpy(batch["tokens"]).long()
    n_params = sum(p.numel() for p in params)
    jax_params = count_params(config)
    print(
        f"  parameters: jaxlm qwen3_next-{size} {jax_params:,}, transformers Qwen3NextForCausalLM {n_params:,} "
        f"({(n_params - jax_params) / jax_params:+.2%}); attention {model.config._attn_implementation!r}, "
        f"experts {getattr(model.config, '_experts_implementation', 'n/a')!r}",
        flush=True,
    )

    def step(threads: int) -> Callable[[], None]:
        def run() -> None:
            torch.set_num_threads(threads)
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=tokens, labels=tokens).loss  # labels shift inside: next-token loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            opt.step()

        return run

    cases = []
    for threads in thread_counts:
        case = Case("torch", "qwen3_next", size, n_params, flops_per_token(config, seq_len), step(threads), threads)
        case.first_step_s = timed_first_call(case.run)
        cases.append(case)
    return cases


def torch_missing() -> str | None:
    """Why the torch reference cannot run, or None when it can."""
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as err:
        return f"{err.name} is not installed (pip install torch transformers; the CPU build of torch is enough)"
    if not hasattr(transformers, "Qwen3NextForCausalLM"):
        return f"transformers {transformers.__version__} has no Qwen3NextForCausalLM (it needs >= 4.57)"
    return None


def measure(cases: list[Case], repeats: int, probe: Callable[[], float]) -> list[float]:
    """``repeats`` rounds, each timing one step of every case, the order rotated each round, and
    the matmul probe; returns the probe's FLOP/s per round."""
    rates = []
    for r in range(repeats):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            start = time.perf_counter()
            case.run()
            case.times.append(time.perf_counter() - start)
        rates.append(probe())
        steps = ", ".join(f"{c.label} {c.times[-1]:.2f}s" for c in cases)
        print(f"  round {r + 1}/{repeats} (load {load_average()}, matmul {rates[-1] / 1e9:.0f} GFLOP/s): {steps}",
              flush=True)
    return rates


def write_csv(path: Path, cases: list[Case], batch_size: int, seq_len: int, peak: float, best_probe: float,
              device: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = batch_size * seq_len
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for c in cases:
            flops = c.flops_per_token * tokens / c.best()
            writer.writerow(dict(
                framework=c.framework, preset=c.preset, size=c.size, threads=c.threads or "", params=c.params,
                batch_size=batch_size, seq_len=seq_len, flops_per_token=f"{c.flops_per_token:.0f}",
                best_s=f"{c.best():.4f}", median_s=f"{c.median():.4f}", spread=f"{c.spread():.3f}",
                tokens_per_s=f"{tokens / c.best():.1f}", tokens_per_s_median=f"{tokens / c.median():.1f}",
                mfu=f"{flops / peak:.5f}", mfu_best_probe=f"{flops / best_probe:.5f}",
                first_step_s=f"{c.first_step_s:.1f}", peak_flops=f"{peak:.4g}", best_probe_flops=f"{best_probe:.4g}",
                device=device,
            ))


def report(cases: list[Case], batch_size: int, seq_len: int, peak: float, best_probe: float) -> None:
    tokens = batch_size * seq_len
    print("\n| framework | preset | size | params | tokens/s (best) | tokens/s (median) | spread | MFU | "
          "MFU vs best probe | first step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        flops = c.flops_per_token * tokens / c.best()
        framework = f"{c.framework}, {c.threads} thread{'s' * (c.threads != 1)}" if c.threads else c.framework
        print(f"| {framework} | {c.preset} | {c.size} | {c.params / 1e6:.2f}M | {tokens / c.best():,.0f} | "
              f"{tokens / c.median():,.0f} | {c.spread():.2f}x | {flops / peak:.1%} | {flops / best_probe:.1%} | "
              f"{c.first_step_s:.1f} |")
    pairs = [(j, t) for t in cases if t.framework == "torch" for j in cases
             if j.framework == "jaxlm" and (j.preset, j.size) == (t.preset, t.size)]
    if pairs:
        print("\njaxlm / torch tokens/s, same config, batch and sequence length:")
    for j, t in pairs:
        rounds = [tt / jt for jt, tt in zip(j.times, t.times)]
        print(f"  {j.preset}-{j.size} vs {t.label}: best {t.best() / j.best():.2f}x, median "
              f"{t.median() / j.median():.2f}x, per round {min(rounds):.2f}x to {max(rounds):.2f}x "
              f"({len(rounds)} rounds)")


LOOP_FILES = (
    "jaxlm/train.py", "jaxlm/training/args.py", "jaxlm/training/checkpointing.py", "jaxlm/training/loop.py",
    "jaxlm/training/metrics.py", "jaxlm/training/step.py",
)
# Runs in each tree's process: the job of the arguments, printing when each train step was logged.
_LOOP_DRIVER = """
import json, sys, time
from jaxlm.training import loop
from jaxlm.training.args import parse_args

logged = {}

class TimedLog(loop.MetricsLog):
    def log(self, step, values, split="train"):
        super().log(step, values, split)
        if split == "train":
            logged[step] = time.perf_counter()

loop.MetricsLog = TimedLog
loop.train(parse_args(sys.argv[1:]))
print("LOGGED " + json.dumps(logged))
"""


def loop_trees(root: Path, rev: str, into: Path) -> dict[str, Path]:
    """{"baseline", "current"} -> a folder holding a copy of ``root``'s jaxlm and kernels_pallas;
    in "baseline" the LOOP_FILES are those of git revision ``rev``."""
    trees = {}
    for name in ("baseline", "current"):
        for package in ("jaxlm", "kernels_pallas"):
            shutil.copytree(root / package, into / name / package, ignore=shutil.ignore_patterns("__pycache__"))
        trees[name] = into / name
    for path in LOOP_FILES:
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True,
                              text=True).stdout
        (trees["baseline"] / path).write_text(text)
    return trees


def loop_rates(tree: Path, train_args: list[str], out: Path, first: int, last: int, window: int,
               tokens_per_step: int, compile_cache: Path) -> tuple[float, float]:
    """One training job of ``tree`` in its own process: (tokens/s of steps first+1 ... last, that
    of its fastest ``window`` steps between two multiples of ``window``). The jobs share a
    persistent compilation cache (the step is the same program in both trees), so that a round
    costs little more than its timed steps."""
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run([sys.executable, "-c", _LOOP_DRIVER, *train_args, "--out", str(out)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the job of {tree} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("LOGGED "))
    logged = {int(step): t for step, t in json.loads(line.removeprefix("LOGGED ")).items()}
    ends = range(first + window, last + 1, window)
    fastest = min(logged[end] - logged[end - window] for end in ends)
    return (last - first) * tokens_per_step / (logged[last] - logged[first]), window * tokens_per_step / fastest


def loop_main(args: argparse.Namespace, presets: list[str], sizes: list[str]) -> None:
    """The --loop-baseline mode: interleaved rounds of whole training jobs, baseline and current."""
    if not 1 <= args.loop_from < args.loop_steps:
        raise SystemExit(f"--loop-from must be in [1, --loop-steps={args.loop_steps}), got {args.loop_from}")
    if args.loop_window < 1 or (args.loop_steps - args.loop_from) % args.loop_window:
        raise SystemExit(f"--loop-window must be >= 1 and divide --loop-steps - --loop-from, got {args.loop_window}")
    root = Path(__file__).resolve().parents[1]
    tokens_per_step = args.batch_size * args.seq_len
    print(f"# Training loop: {args.loop_steps} steps of {args.batch_size} x {args.seq_len} tokens, tokens/s of steps "
          f"{args.loop_from + 1}-{args.loop_steps}; baseline: {', '.join(LOOP_FILES)} at {args.loop_baseline}")
    print(f"device: {cpu_name()}, {cores()} cores; jax {jax.__version__}; load average {load_average()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        trees = loop_trees(root, args.loop_baseline, Path(tmp))
        names = list(trees)
        for name in presets:
            for size in sizes:
                train_args = [
                    "--preset", name, "--size", size, "--steps", str(args.loop_steps), "--batch-size",
                    str(args.batch_size), "--seq-len", str(args.seq_len), "--checkpoint-every", str(args.loop_steps),
                    "--eval-every", str(args.loop_steps), "--eval-batches", "1", "--sample-tokens", "1",
                    "--keep-checkpoints", "1", "--warmup", "1",
                ]
                rates: dict[str, list[tuple[float, float]]] = {tree: [] for tree in names}
                for r in range(args.repeats):
                    order = names[r % 2:] + names[:r % 2]
                    for tree in order:
                        out = Path(tmp) / f"run-{name}-{size}-{tree}-{r}"
                        rates[tree].append(loop_rates(trees[tree], train_args, out, args.loop_from, args.loop_steps,
                                                      args.loop_window, tokens_per_step, Path(tmp) / "jax-cache"))
                    print(f"  {name}-{size} round {r + 1}/{args.repeats} (load {load_average()}): " + ", ".join(
                        f"{tree} {rates[tree][-1][0]:,.0f} tokens/s (best window {rates[tree][-1][1]:,.0f})"
                        for tree in order), flush=True)
                for i, what in enumerate(("whole interval", f"best {args.loop_window}-step window")):
                    base, cur = ([rate[i] for rate in rates[tree]] for tree in ("baseline", "current"))
                    ratios = [c / b for b, c in zip(base, cur)]
                    # The order alternates, so over an even number of rounds a load that drifts
                    # during the run favours each tree equally often: the geometric mean cancels it.
                    print(f"{name}-{size}, {what}: baseline median {statistics.median(base):,.0f} tokens/s, "
                          f"current median {statistics.median(cur):,.0f} tokens/s; current / baseline per round "
                          f"{min(ratios):.3f}x to {max(ratios):.3f}x, geometric mean "
                          f"{statistics.geometric_mean(ratios):.3f}x ({args.repeats} rounds)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated jaxlm presets")
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated sizes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument("--torch-sizes", default="tiny", help="comma-separated qwen3_next sizes to run in transformers")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--csv", type=Path, default=Path(__file__).with_name("bench_train.csv"))
    parser.add_argument("--loop-baseline", metavar="REV",
                        help="time whole training jobs against the loop files of this git revision")
    parser.add_argument("--loop-steps", type=int, default=60, help="steps of each job in --loop-baseline mode")
    parser.add_argument("--loop-from", type=int, default=10, help="timed steps start after this one")
    parser.add_argument("--loop-window", type=int, default=10,
                        help="steps of the windows whose fastest is also reported (a multiple of --log-every)")
    args = parser.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    sizes = [s for s in args.sizes.split(",") if s]
    torch_sizes = [] if args.no_torch else [s for s in args.torch_sizes.split(",") if s]
    for name, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if args.loop_baseline:
        loop_main(args, presets, sizes)
        return

    total = time.perf_counter()
    device = jax.devices()[0]
    device_text = f"{device.device_kind} ({device.platform}), {cpu_name()}, {cores()} cores"
    peak, peak_source = peak_flops_per_second(device, dtype="float32")
    mesh = sharding.make_mesh(None, devices=[device])
    print(f"# Training step: batch {args.batch_size} x {args.seq_len} tokens, float32, AdamW, best of {args.repeats}")
    print(f"device: {device_text}; jax {jax.__version__}; load average {load_average()}")
    print(f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source})\n")

    batch = make_batch(args.batch_size, args.seq_len)
    cases: list[Case] = []
    for size in sizes:
        for name in presets:
            start = time.perf_counter()
            cases.append(jaxlm_case(name, size, batch, args.seq_len, mesh))
            print(f"built jaxlm {name}-{size} ({cases[-1].params / 1e6:.2f}M params): first step "
                  f"{cases[-1].first_step_s:.1f}s, {time.perf_counter() - start:.1f}s in all", flush=True)
    if torch_sizes:
        missing = torch_missing()
        if missing:
            print(f"\nskipping the transformers comparison: {missing}\n")
        else:
            import torch
            import transformers

            print(f"transformers {transformers.__version__}, torch {torch.__version__}")
            thread_counts = sorted({cores(), 1}, reverse=True)
            for size in torch_sizes:
                start = time.perf_counter()
                cases += torch_cases(size, batch, args.seq_len, thread_counts)
                print(f"built torch qwen3_next-{size}: first steps "
                      + ", ".join(f"{c.first_step_s:.1f}s" for c in cases[-len(thread_counts):])
                      + f", {time.perf_counter() - start:.1f}s in all", flush=True)

    print(f"\ntiming {len(cases)} cases, {args.repeats} interleaved rounds")
    rates = measure(cases, args.repeats, matmul_probe(device))
    best_probe = max(rates + [peak])
    print(f"\nmatmul probe over the rounds: {min(rates) / 1e9:.0f} to {max(rates) / 1e9:.0f} GFLOP/s; MFU uses "
          f"{peak / 1e9:.1f} (peak_flops_per_second), 'MFU vs best probe' {best_probe / 1e9:.1f}")
    report(cases, args.batch_size, args.seq_len, peak, best_probe)
    write_csv(args.csv, cases, args.batch_size, args.seq_len, peak, best_probe, device_text)
    print(f"\nwrote {args.csv}; total {time.perf_counter() - total:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
