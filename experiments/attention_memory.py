"""Flash attention as a constant factor: memory against T of three exact causal attentions.

  python experiments/attention_memory.py [--seq-lens 1024 2048 4096 8192 16384 32768]
      [--run-limit-gb 8] [--repeats 3] [--out experiments/attention_memory]
  python experiments/attention_memory.py --quick      # T = 256 and 512: the pipeline, no claim

The forms, B=1, H=4, D=64, float32, causal, the forward pass and forward+backward:
  materialised  softmax(QKᵀ)V written out: the [B, H, T, T] scores and probabilities exist whole;
  xla           ``ops.attention(impl="xla")``: exact softmax over blocks of 512 query rows
                (``lax.map``, each block rematerialised in the backward), so one block's
                512·T·H scores exist at a time;
  pallas        ``ops.attention(impl="pallas")``: the flash-attention kernel (online softmax over
                key tiles); on a CPU it runs in Pallas interpret mode, which is for correctness,
                and its times are not a speed claim.

Two memory measures, both in bytes:
  compiled  from ``jax.jit(f).lower(shapes).compile().memory_analysis()``: XLA's buffer assignment,
            arguments + outputs + temporaries − aliases. Needs no allocation, so it covers every T.
  measured  the peak resident-set growth while the compiled function runs, over its RSS just
            before (inputs already allocated), in a fresh child process per case, sampled from
            /proc/self/statm every 0.5 ms; glibc is told to mmap every allocation of 64 KiB and
            more (MALLOC_MMAP_THRESHOLD_), so freed buffers leave the resident set. It is to be set
            beside the compiled outputs + temporaries. A case runs only when its compiled total is
            at most --run-limit-gb, and its child has an address-space limit (RLIMIT_AS) a few GB above.

Correctness: at T <= --check-max-len every form's output and gradients are compared with the
materialised form's in float32 (the numerics contract, relative RMS).

On a CPU what this shows is memory, N² against N. Flash attention's speed factor comes from keeping
tiles in on-chip memory on a GPU or TPU; experiments/gpu_attention.py measures that on a GPU.

Notebooks import this file as a module of the checkout (see ``compiled_memory``, ``measure``,
``plot``), with the repository root on sys.path: ``from experiments import attention_memory``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

if __package__ in (None, ""):  # run as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from experiments import reporting
from jaxlm import ops

HERE = pathlib.Path(__file__).resolve().parent
B, H, D = 1, 4, 64
FORMS = ("materialised", "xla", "pallas")
PASSES = ("fwd", "fwd_bwd")
# One colour per form, one line style per pass; filled markers compiled, hollow markers measured.
FORM_COLORS = {"materialised": "tab:red", "xla": "tab:blue", "pallas": "tab:green"}
PASS_STYLES = {"fwd": "-", "fwd_bwd": "--"}
FIELDS = ["form", "pass", "T", "compiled_bytes", "compiled_temp_bytes", "compiled_out_bytes", "measured_bytes",
          "seconds", "status"]
GIB = 1024**3
_HIGHEST = jax.lax.Precision.HIGHEST


def materialised_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax(scale·QKᵀ)V with the whole score matrix: q, k, v [B, T, H, D] -> [B, T, H, D]."""
    t = q.shape[1]
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision=_HIGHEST) * q.shape[-1] ** -0.5  # [B, H, T, T]
    causal = jnp.tril(jnp.ones((t, t), bool))
    p = jax.nn.softmax(jnp.where(causal, s, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, v, precision=_HIGHEST)


def attention_fn(form: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """The causal attention of ``form`` (one of FORMS) as a function of q, k, v [B, T, H, D]."""
    if form == "materialised":
        return materialised_attention
    if form in ("xla", "pallas"):
        return lambda q, k, v: ops.attention(q, k, v, causal=True, impl=form)
    raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")


def program(form: str, backward: bool) -> Callable:
    """f(q, k, v, ct): the forward output, or with ``backward`` the gradients of Σ o·ct wrt q, k, v."""
    fn = attention_fn(form)
    if not backward:
        return lambda q, k, v, ct: fn(q, k, v)
    return jax.grad(lambda q, k, v, ct: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2))


def _shapes(t: int) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct((B, t, H, D), jnp.float32)] * 4


@functools.lru_cache(maxsize=8)
def compiled(form: str, t: int, backward: bool = False) -> jax.stages.Compiled:
    """The case compiled ahead of time for [B, t, H, D] float32 inputs (nothing allocated)."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t must be a positive int (sequence length), got {t!r}")
    return jax.jit(program(form, backward)).lower(*_shapes(t)).compile()


def compiled_memory(form: str, t: int, backward: bool = False) -> dict[str, int]:
    """XLA's buffer assignment for one case, without allocating: {"total", "temp", "out", "args"} bytes."""
    stats = compiled(form, t, backward).memory_analysis()
    out = stats.output_size_in_bytes - stats.alias_size_in_bytes
    return dict(total=stats.argument_size_in_bytes + out + stats.temp_size_in_bytes,
                temp=stats.temp_size_in_bytes, out=out, args=stats.argument_size_in_bytes)


def inputs(t: int, seed: int = 0) -> list[jax.Array]:
    """q, k, v and the output cotangent, [B, T, H, D] float32 normal."""
    return list(jax.random.normal(jax.random.PRNGKey(seed), (4, B, t, H, D), jnp.float32))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident set every ``interval`` seconds while in the ``with`` block;
    ``.growth`` is the peak over the RSS on entry."""

    def __init__(self, interval: float = 5e-4):
        self.interval = interval

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def measure(form: str, t: int, backward: bool = False, repeats: int = 3) -> dict[str, float]:
    """Runs one case in this process: {"seconds": best of ``repeats`` after a warm-up (one repeat
    when the warm-up took over 10 s), "measured_bytes": peak RSS growth over all runs}. For an
    RSS figure that means something, call it in a fresh process (``measure_in_child``)."""
    fn = compiled(form, t, backward)
    args = inputs(t)
    jax.block_until_ready(args)
    best = float("inf")
    with PeakRSS() as rss:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        warm = time.perf_counter() - start
        for _ in range(1 if warm > 10 else repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best = min(best, time.perf_counter() - start)
    return dict(seconds=best, measured_bytes=rss.growth)


def measure_in_child(form: str, t: int, backward: bool, repeats: int, address_limit: int,
                     timeout: float = 1800) -> dict:
    """``measure`` in a fresh Python process with RLIMIT_AS = address_limit bytes and glibc's mmap
    threshold at 64 KiB. Returns its dict, or {"status": why it failed} (out of memory, timeout)."""
    case = json.dumps(dict(form=form, t=t, backward=backward, repeats=repeats))
    code = (
        "import resource, sys, runpy; "
        f"resource.setrlimit(resource.RLIMIT_AS, ({address_limit}, {address_limit})); "
        f"sys.argv = [{str(pathlib.Path(__file__))!r}, '--child', {case!r}]; "
        f"runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status=f"timeout after {timeout:.0f} s")
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]) | dict(status="ran")
    tail = (done.stderr.strip().splitlines() or [""])[-1][:200]
    return dict(status=f"failed (exit {done.returncode}): {tail}")


def check_agreement(t: int) -> dict[str, tuple[float, float]]:
    """{form: (relative RMS of o, the largest relative RMS of dq, dk, dv)} against the materialised form."""
    q, k, v, ct = inputs(t, seed=1)
    results = {}
    for form in FORMS:
        results[form] = (compiled(form, t, False)(q, k, v, ct), compiled(form, t, True)(q, k, v, ct))
    ref_o, ref_g = results["materialised"]
    return {
        form: (_rel_rms(o, ref_o), max(_rel_rms(a, b) for a, b in zip(g, ref_g)))
        for form, (o, g) in results.items() if form != "materialised"
    }


def _rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-8))


def run(seq_lens: list[int], run_limit: float, repeats: int, csv_path: pathlib.Path | None = None,
        in_process: bool = False) -> list[dict]:
    """Every form × pass × T: compiled memory always, time and measured memory when the compiled
    total is at most ``run_limit`` bytes, each case in a fresh child process (``in_process``: in
    this one, which is quicker and makes the RSS figures rough). Rows (keys FIELDS) are printed
    and, with csv_path, written as they come."""
    with reporting.RowWriter(csv_path, FIELDS) as out:
        for t in seq_lens:
            for form in FORMS:
                for pass_name in PASSES:
                    backward = pass_name == "fwd_bwd"
                    mem = compiled_memory(form, t, backward)
                    row = dict(form=form, T=t, compiled_bytes=mem["total"], compiled_temp_bytes=mem["temp"],
                               compiled_out_bytes=mem["out"], measured_bytes="", seconds="", **{"pass": pass_name})
                    if mem["total"] > run_limit:
                        row["status"] = f"not run: compiled {mem['total'] / GIB:.1f} GiB > {run_limit / GIB:.1f} GiB"
                    elif in_process:
                        row.update(measure(form, t, backward, repeats), status="ran in-process")
                    else:
                        got = measure_in_child(form, t, backward, repeats, address_limit=int(run_limit + 4 * GIB))
                        row["status"] = got.pop("status")
                        row.update(got)
                    out.add(row)
                    seconds = f"{row['seconds'] * 1e3:10.1f} ms" if row["seconds"] != "" else " " * 13
                    measured = f"{row['measured_bytes'] / 2**20:9.1f}" if row["measured_bytes"] != "" else " " * 9
                    print(f"T={t:6d} {form:12s} {pass_name:7s} compiled {mem['total'] / 2**20:10.1f} MiB "
                          f"(temp+out {(mem['temp'] + mem['out']) / 2**20:10.1f})  measured {measured} MiB "
                          f"{seconds}  {row['status']}", flush=True)
    return out.rows


def read_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a CSV written by ``run``, numbers parsed (empty cells stay "")."""
    def num(x: str):
        return "" if x == "" else float(x) if "." in x or "e" in x else int(x)

    with open(path, newline="") as fh:
        return [{k: (num(v) if k in FIELDS[2:8] else v) for k, v in r.items()} for r in csv.DictReader(fh)]


def slope(rows: list[dict], form: str, pass_name: str, key: str, t_min: int = 2048) -> float:
    """Log-log slope of ``key`` against T over T >= t_min (2 means N², 1 means N)."""
    pts = [(r["T"], r[key]) for r in rows
           if r["form"] == form and r["pass"] == pass_name and r[key] != "" and r["T"] >= t_min and r[key] > 0]
    if len(pts) < 2:
        return float("nan")
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


def plot(rows: list[dict], path: pathlib.Path | None = None, title: str = ""):
    """Two log-log panels: memory against T (compiled lines with filled markers, measured hollow
    markers) and time against T. Returns the figure; writes it to ``path`` when given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(13, 5.5))
    for form in FORMS:
        for pass_name in PASSES:
            rs = sorted((r for r in rows if r["form"] == form and r["pass"] == pass_name), key=lambda r: r["T"])
            style = dict(color=FORM_COLORS[form], ls=PASS_STYLES[pass_name])
            ax_m.loglog([r["T"] for r in rs], [r["compiled_bytes"] / 2**20 for r in rs], marker="o", ms=4, **style)
            ran = [r for r in rs if r["measured_bytes"] != ""]
            ax_m.loglog([r["T"] for r in ran], [max(r["measured_bytes"], 1) / 2**20 for r in ran], ls="none",
                        marker="s", ms=8, mfc="none", mec=FORM_COLORS[form])
            timed = [r for r in ran if r["seconds"] != ""]
            ax_t.loglog([r["T"] for r in timed], [r["seconds"] for r in timed], marker="o", ms=4, **style)
    ax_m.set_title("memory: compiled (lines) and measured RSS growth (squares)")
    ax_m.set_ylabel("MiB")
    ax_t.set_title("time (pallas: interpret mode, not a speed)")
    ax_t.set_ylabel("seconds")
    for ax in (ax_m, ax_t):
        ax.set_xlabel("sequence length T")
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend([reporting.line(FORM_COLORS[f]) for f in FORMS], list(FORMS), title="form",
                loc="upper left", fontsize=8)
    ax_t.legend([reporting.line(ls=PASS_STYLES[p]) for p in PASSES] + [reporting.point("s", filled=False)],
                ["forward", "forward + backward", "measured RSS"], loc="upper left", fontsize=8)
    return reporting.finish(fig, title or f"exact causal attention, B={B}, H={H}, D={D}, float32", path)


def report(rows: list[dict]) -> None:
    """Prints the memory and time tables and the log-log slopes."""
    seq_lens = sorted({r["T"] for r in rows})
    head = " | ".join(f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in seq_lens)
    for key, label, scale in (("compiled_bytes", "compiled MiB", 2**-20), ("measured_bytes", "measured MiB", 2**-20),
                              ("seconds", "seconds", 1.0)):
        print(f"\n| {label} | pass | {head} |\n|---|---|" + "---|" * len(seq_lens))
        for form in FORMS:
            for pass_name in PASSES:
                by_t = {r["T"]: r[key] for r in rows if r["form"] == form and r["pass"] == pass_name}
                cells = [f"{by_t[t] * scale:.4g}" if by_t.get(t, "") != "" else "—" for t in seq_lens]
                print(f"| {form} | {pass_name} | " + " | ".join(cells) + " |")
    print("\nlog-log slopes against T (T >= 2K; 2 = N², 1 = N):")
    for form in FORMS:
        for pass_name in PASSES:
            print(f"  {form:12s} {pass_name:7s} compiled memory {slope(rows, form, pass_name, 'compiled_bytes'):.2f}"
                  f"  compiled temporaries "
                  f"{slope([dict(r, temp=r['compiled_temp_bytes']) for r in rows], form, pass_name, 'temp'):.2f}"
                  f"  time {slope(rows, form, pass_name, 'seconds'):.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--run-limit-gb", type=float, default=8.0,
                   help="run a case only if its compiled total is this small")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-max-len", type=int, default=4096, help="compare the forms' numbers up to this T")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="OUT.csv and OUT.png (default experiments/attention_memory; with --quick, in the temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="T = 128, 256, one repeat, in-process: the pipeline, no claim")
    p.add_argument("--in-process", action="store_true", help="measure in this process, not a child per case")
    p.add_argument("--plot-only", action="store_true", help="tables and plot from OUT.csv, measuring nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one case, in the fresh process that measure_in_child started
        case = json.loads(args.child)
        print("RESULT " + json.dumps(measure(case["form"], case["t"], case["backward"], case["repeats"])), flush=True)
        return
    if args.out is None:
        quick_out = pathlib.Path(tempfile.gettempdir()) / "attention_memory_quick"
        args.out = quick_out if args.quick else HERE / "attention_memory"
    csv_path, png = args.out.with_suffix(".csv"), args.out.with_suffix(".png")
    if args.quick:
        args.seq_lens, args.repeats, args.check_max_len, args.in_process = [128, 256], 1, 128, True
    if not args.plot_only:
        print(f"device: {jax.devices()[0].device_kind}; B={B} H={H} D={D} float32 causal; "
              f"load average {os.getloadavg()}", flush=True)
        for t in [t for t in args.seq_lens if t <= args.check_max_len]:
            for form, (err_o, err_g) in check_agreement(t).items():
                print(f"check T={t}: {form} vs materialised: o rel RMS {err_o:.1e}, gradients {err_g:.1e} "
                      f"(contract 1e-5 / 1e-4)", flush=True)
        start = time.perf_counter()
        run(args.seq_lens, args.run_limit_gb * GIB, args.repeats, csv_path, in_process=args.in_process)
        print(f"measured in {time.perf_counter() - start:.0f} s; load average {os.getloadavg()}")
    reporting.report_and_plot(csv_path, png, read_rows, report, plot)


if __name__ == "__main__":
    main()
