"""Contexts of millions of tokens: prefill time per token, peak memory and decode step against context.

  python experiments/long_context.py [--models gated_deltanet:tiny gated_deltanet:small qwen3_next:tiny
      qwen3_next:small transformer:tiny transformer:small] [--contexts 256 4096 16384 ... 16777216]
      [--piece 512] [--full-budget-s 900] [--recurrent-full-budget-s 1200] [--sample-budget-s 600]
      [--memory-limit-gb 14] [--decode-steps 16]
  python experiments/long_context.py --quick     # transformer tiny at 512 and 1024: the pipeline only

Each (model, context C) runs in a fresh child process with an address-space limit (RLIMIT_AS), so
its memory is its own and an out-of-memory ends the child, not the run. Two resident-set peaks:
while the pieces and the decode steps run, compiles done (sampled from /proc/self/statm every ms;
the one plotted), and the whole child's (its VmHWM, read by the parent while it waits, compiles
included; the only one of a child that ran out of memory). The model is ``preset(name, size)`` with random weights, float32,
batch 1, and its cache is ``init_cache(max_len=C + decode steps)``. The context is fed as a prefill in
pieces of ``--piece`` tokens, one compiled call per piece, the cache donated and passed from call to
call (tests/test_long_context.py checks that this equals one call, for every layer kind). Then
``--decode-steps`` single-token steps from the cache at position C.

Modes, chosen per case before it runs from a cost estimate (see ``estimate_seconds``):
  full     every piece of the C tokens runs; time per token is the median over the pieces after the
           first (the first also pays first-touch page faults), and the total is reported too;
  sampled  when the full prefill would exceed --full-budget-s (--recurrent-full-budget-s for a
           model without attention layers): the cache is allocated at its full
           size and set to a synthetic state at position C − 2·piece (every KV slot before it
           written and visible, random keys, values and recurrent states; ``synthetic_cache``), and
           the last two pieces run, the second timed. A piece's cost does not depend on how full
           the cache is: cached attention reads every slot of its fixed-size cache, masked. The
           run checks this: at each context where it ran the full prefill it also times the
           sampled mode, and the ratio is printed;
           When even that is predicted over --sample-budget-s it runs all the same with that budget as its
           timeout, so a model's line ends where it runs out of memory or of time ("oom", "timeout");
  skipped  a larger context than one that ran out.
A full prefill that overruns its timeout (3× the prediction + 300 s: the estimate was wrong) is
kept as "full timed out", and the sampled mode measures that context instead.
Cached attention takes a prefill piece over the cache in blocks of keys (``ops.attention.xla``,
KEY_BLOCK slots), so a piece's temporaries do not grow with the context; the cache itself does.
Before each case the script prints the model's causal prefill FLOPs (``jaxlm.models.flops``) and its
predicted time; the cached path does about twice the causal attention work (every slot is scored).

Notebook helpers (import with the checkout's root on sys.path, ``from experiments import long_context``):
``cache_bytes(config, max_len)`` splits a model's cache into KV and recurrent bytes without allocating;
``prefill_in_pieces`` runs a model over a long context in this process; ``run_case`` / ``run_in_child``
run one case; ``read_rows``, ``summary`` and ``plot(rows)`` read and draw a CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import reporting
from experiments.attention_memory import PeakRSS
from jaxlm.layers.cache import RecurrentCache
from jaxlm.layers.mla import LatentCache
from jaxlm.models import LM, ModelConfig, preset
from jaxlm.models.flops import flops_per_token
from jaxlm.ops import KVCache

HERE = pathlib.Path(__file__).resolve().parent
GIB = 1024**3
MODELS = ["gated_deltanet:tiny", "gated_deltanet:small", "qwen3_next:tiny", "qwen3_next:small",
          "transformer:tiny", "transformer:small"]
CONTEXTS = [256, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216]
SAMPLED_PIECES = 2  # pieces a sampled case runs: one to warm up, one timed
RAN_OUT = {"oom": "x", "timeout": "+"}  # modes of a case that ran out, and their plot markers
# One colour per family, one line style per size; filled markers full, hollow sampled, x out of memory.
FAMILY_COLORS = {"gated_deltanet": "tab:green", "qwen3_next": "tab:blue", "transformer": "tab:red"}
SIZE_STYLES = {"tiny": "-", "small": "--"}
FIELDS = ["model", "size", "context", "mode", "piece", "pieces_run", "prefill_s", "s_per_token",
          "first_piece_s", "decode_step_s", "decode_step_median_s", "run_peak_rss_bytes", "peak_rss_bytes",
          "cache_bytes",
          "kv_cache_bytes", "recurrent_bytes", "piece_temp_bytes", "causal_prefill_gflop",
          "predicted_s", "load_start", "load_end", "status"]


# ----------------------------------------------------------------------------- model-side helpers


def cache_bytes(config: ModelConfig, max_len: int, batch_size: int = 1) -> dict[str, int]:
    """{"kv", "recurrent", "total"}: bytes of ``init_cache(batch_size, max_len)``, split into the
    attention layers' KV caches and the recurrent layers' states and conv states; nothing is allocated."""
    shapes = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)).init_cache(batch_size=batch_size, max_len=max_len))
    out = dict(kv=0, recurrent=0)
    for layer in shapes:
        if layer is None:
            continue
        kind = "kv" if isinstance(layer, (KVCache, LatentCache)) else "recurrent"
        out[kind] += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layer))
    return out | dict(total=out["kv"] + out["recurrent"])


def cached_call(model: LM) -> tuple:
    """(the model's state, fn): fn(state, cache, tokens [B, T]) -> (the new cache, the last
    token's logits [B, N]) is the model's cached call as a jitted pure function with the cache
    donated. T > 1 is a prefill piece, T == 1 a decode step; each T compiles once."""
    graphdef, state = nnx.split(model)

    def call(state, cache, tokens):
        out = nnx.merge(graphdef, state)(tokens, cache=cache)
        return out.cache, out.logits[:, -1]

    return state, jax.jit(call, donate_argnums=(1,))


def prefill_in_pieces(model: LM, tokens: np.ndarray, piece: int, cache: tuple | None = None,
                      on_piece=None) -> tuple[tuple, jax.Array]:
    """Feeds tokens [1, C] to ``model`` in calls of ``piece`` tokens, passing the cache between
    calls; returns (the cache, the last token's logits [1, N]). ``on_piece(i, seconds)`` is called
    after each piece. The cache defaults to ``init_cache(max_len=C)``."""
    c = tokens.shape[1]
    if isinstance(piece, bool) or not isinstance(piece, int) or piece < 1:
        raise ValueError(f"piece must be a positive int (tokens per call), got {piece!r}")
    cache = model.init_cache(batch_size=tokens.shape[0], max_len=c) if cache is None else cache
    state, fn = cached_call(model)
    logits = None
    for i, start in enumerate(range(0, c, piece)):
        t0 = time.perf_counter()
        cache, logits = fn(state, cache, jnp.asarray(tokens[:, start:start + piece]))
        jax.block_until_ready(logits)
        if on_piece is not None:
            on_piece(i, time.perf_counter() - t0)
    return cache, logits


def synthetic_cache(cache: tuple, pos: int, seed: int = 0) -> tuple:
    """The cache as if ``pos`` tokens of one document had been written: every KV slot before pos
    (all of a ring that has wrapped) holds a random key and value of document 0 and is visible;
    recurrent and conv states are random. A cached call then does the work it does at position pos."""
    key = jax.random.PRNGKey(seed)
    out = []
    for layer in cache:
        key, k1, k2 = jax.random.split(key, 3)
        if isinstance(layer, KVCache):
            slots = layer.k.shape[2]
            written = jnp.arange(slots) < pos
            out.append(layer._replace(
                k=jax.random.normal(k1, layer.k.shape, layer.k.dtype),
                v=jax.random.normal(k2, layer.v.shape, layer.v.dtype),
                key_doc=jnp.broadcast_to(jnp.where(written, 0, -1).astype(jnp.int32), layer.key_doc.shape),
                doc=jnp.zeros_like(layer.doc), pos=jnp.asarray(pos, jnp.int32),
            ))
        elif isinstance(layer, RecurrentCache):
            conv = None if layer.conv is None else 0.5 * jax.random.normal(k2, layer.conv.shape, layer.conv.dtype)
            out.append(RecurrentCache(state=0.1 * jax.random.normal(k1, layer.state.shape, layer.state.dtype),
                                      conv=conv))
        else:
            out.append(layer)
    return tuple(out)


# ----------------------------------------------------------------------------- one case (child side)


def run_case(name: str, size: str, context: int, piece: int, mode: str, decode_steps: int,
             seed: int = 0) -> dict:
    """One (model, context) case in this process; returns its measurements (keys of FIELDS)."""
    config = preset(name, size)
    model = LM(config, rngs=nnx.Rngs(seed))
    piece = min(piece, context)
    if context % piece:
        raise ValueError(f"context {context} must be a multiple of the piece {piece}")
    state, fn = cached_call(model)
    cache = model.init_cache(batch_size=1, max_len=context + decode_steps)
    rng = np.random.default_rng(seed)
    tokens = lambda n: jnp.asarray(rng.integers(0, config.vocab_size, (1, n)), jnp.int32)
    compiled = fn.lower(state, cache, tokens(piece)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    n_pieces = context // piece
    if mode == "sampled":
        n_pieces = min(SAMPLED_PIECES, n_pieces)
        cache = synthetic_cache(cache, context - n_pieces * piece, seed)
    step_compiled = fn.lower(state, cache, tokens(1)).compile()
    times, decode = [], []
    with PeakRSS(interval=1e-3) as rss:  # the resident set while the context is held, compiles done
        for _ in range(n_pieces):
            t0 = time.perf_counter()
            cache, logits = compiled(state, cache, tokens(piece))
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - t0)
        for _ in range(decode_steps):
            t0 = time.perf_counter()
            cache, logits = step_compiled(state, cache, tokens(1))
            jax.block_until_ready(logits)
            decode.append(time.perf_counter() - t0)
    steady = times[1:] or times
    if not bool(jnp.isfinite(logits).all()):
        raise FloatingPointError(f"non-finite logits after the prefill and decode of {name}-{size} at {context}")
    return dict(piece=piece, pieces_run=n_pieces, prefill_s=sum(times), s_per_token=float(np.median(steady)) / piece,
                first_piece_s=times[0], decode_step_s=min(decode[1:] or decode),
                decode_step_median_s=float(np.median(decode[1:] or decode)), piece_temp_bytes=temp,
                run_peak_rss_bytes=rss.peak)


OOM_SIGNS = ("RESOURCE_EXHAUSTED", "bad_alloc", "Out of memory", "out of memory", "MemoryError",
             "Cannot allocate memory", "failed to allocate")


def _resident_high_water(pid: int) -> int:
    """The peak resident bytes of process ``pid`` since its exec (VmHWM), 0 once it is gone. Not
    the rusage's ru_maxrss: Linux folds the pre-exec RSS into it, and a child forked from a large
    process (a test session) would report the parent's size."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _hermetic(env) -> dict:
    """The child's environment: no persistent compilation cache, whose reads and writes (of
    another process's entries) would enter the measured time and memory."""
    env = {k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env | {"JAX_ENABLE_COMPILATION_CACHE": "false"}


def run_in_child(name: str, size: str, context: int, piece: int, mode: str, decode_steps: int,
                 memory_limit: int, timeout: float, env: dict | None = None) -> dict:
    """``run_case`` in a fresh Python process with RLIMIT_AS = memory_limit bytes (and environment
    ``env``). Returns its measurements with "peak_rss_bytes" (the child's VmHWM) and "status":
    "ok", "out of memory", "timeout after …" or "failed …"."""
    case = json.dumps(dict(name=name, size=size, context=context, piece=piece, mode=mode, decode_steps=decode_steps))
    code = (
        "import resource, sys, runpy; "
        f"resource.setrlimit(resource.RLIMIT_AS, ({memory_limit}, {memory_limit})); "
        f"sys.argv = [{str(pathlib.Path(__file__))!r}, '--child', {case!r}]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, text=True,
                                env=_hermetic(os.environ if env is None else env))
        deadline = time.monotonic() + timeout
        peak = 0
        while True:
            peak = max(peak, _resident_high_water(proc.pid))
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, _ = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    result = dict(peak_rss_bytes=peak)
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return result | json.loads(line[len("RESULT "):])
    if time.monotonic() > deadline:
        return result | dict(status=f"timeout after {timeout:.0f} s")
    if any(sign in stderr for sign in OOM_SIGNS) or proc.returncode in (-6, -9):
        return result | dict(status="out of memory")
    tail = (stderr.strip().splitlines() or [""])[-1][:200]
    return result | dict(status=f"failed (exit {proc.returncode}): {tail}")


def _child_main(case: dict) -> None:
    try:
        got = run_case(case["name"], case["size"], case["context"], case["piece"], case["mode"], case["decode_steps"])
        got["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - an allocation failure is a result, reported as such
        text = f"{type(exc).__name__}: {exc}"
        if not any(sign in text for sign in OOM_SIGNS):
            raise
        got = dict(status="out of memory")
    print("RESULT " + json.dumps(got), flush=True)


# ----------------------------------------------------------------------------- the sweep (parent side)


def has_attention(config: ModelConfig) -> bool:
    return any(m in "AW" for m, _ in config.layer_kinds())


def estimate_seconds(measured: list[tuple[int, float]], context: int, attention: bool) -> float | None:
    """Predicted seconds per token at ``context`` from (context, s_per_token) measured for the
    same model: a line through the last two points (a cached attention layer's cost per token
    grows linearly with its cache), never below the last; from one point, proportional to the
    context for a model with attention and constant without. None without any point."""
    if not measured:
        return None
    (c2, t2) = measured[-1]
    if len(measured) == 1:
        return t2 * context / c2 if attention else t2
    (c1, t1) = measured[-2]
    slope = max(0.0, (t2 - t1) / (c2 - c1))
    return max(t2, t2 + slope * (context - c2))


def sweep(models: list[str], contexts: list[int], piece: int, decode_steps: int, full_budget: float,
          recurrent_full_budget: float, sample_budget: float, memory_limit: int,
          csv_path: pathlib.Path | None) -> list[dict]:
    """Every model × context, each in a child; rows (keys FIELDS) are printed and written as they
    come. A full prefill runs when predicted within full_budget seconds (recurrent_full_budget
    for a model without attention layers: their full prefill is the claim measured)."""
    rows = []
    # The children share one compilation cache: a recurrent model compiles the same programs at every context.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="long-context-xla-"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    fh = open(csv_path, "w", newline="") if csv_path else None
    writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore") if fh else None
    if writer:
        writer.writeheader()
    try:
        for spec in models:
            name, size = spec.split(":")
            config = preset(name, size)
            attention, measured, exhausted = has_attention(config), [], None
            for context in contexts:
                p = min(piece, context)
                sizes = cache_bytes(config, context + decode_steps)
                gflop = flops_per_token(config, context, training=False) * context / 1e9
                per_token = estimate_seconds(measured, context, attention)
                base = dict(model=name, size=size, context=context, piece=p, cache_bytes=sizes["total"],
                            kv_cache_bytes=sizes["kv"], recurrent_bytes=sizes["recurrent"],
                            causal_prefill_gflop=gflop)
                runs = []
                if exhausted:
                    runs.append(("skipped", f"skipped: a smaller context {exhausted}", None))
                else:
                    full_s = None if per_token is None else per_token * context
                    sampled_s = None if per_token is None else per_token * p * min(SAMPLED_PIECES, context // p)
                    if full_s is None or full_s <= (full_budget if attention else recurrent_full_budget):
                        runs.append(("full", None, full_s))
                        # Where the full prefill runs at a context with several pieces, the sampled
                        # mode runs too, to check it against the full one.
                        if attention and context // p > SAMPLED_PIECES:
                            runs.append(("sampled", None, sampled_s))
                    else:
                        # Over the budget it still runs, until the budget or the memory runs out.
                        runs.append(("sampled", None, sampled_s))
                full_ok = False
                for mode, status, predicted in runs:  # may grow: a full prefill that times out queues the sampled mode
                    row = dict(base, mode=mode, predicted_s=predicted, load_start=os.getloadavg()[0])
                    pred = "no estimate yet" if predicted is None else f"predicted {predicted:.0f} s"
                    print(f"{name}-{size} C={context:>9,}: causal prefill {gflop:,.0f} GFLOP, cache "
                          f"{sizes['total'] / 2**20:,.1f} MiB (KV {sizes['kv'] / 2**20:,.1f}); {mode}, {pred}",
                          flush=True)
                    if status is None:
                        if mode == "sampled" and predicted is not None and predicted > sample_budget:
                            timeout = sample_budget
                        else:
                            timeout = 3 * (predicted if predicted is not None else full_budget) + 300
                        got = run_in_child(name, size, context, p, mode, decode_steps, memory_limit, timeout, env)
                        row.update(got)
                        if row["status"] == "ok" and (mode == "full" or not full_ok):
                            measured.append((context, row["s_per_token"]))
                            full_ok = full_ok or mode == "full"
                        if row["status"] == "out of memory":
                            row["mode"], exhausted = "oom", "ran out of memory"
                        elif row["status"].startswith("timeout") and mode == "full":
                            # The estimate from smaller contexts put the full prefill within its
                            # budget, wrongly (a cached attention layer's cost per token grows with
                            # the context, below the fixed costs at first): measure this context
                            # in the sampled mode instead, and go on.
                            row["mode"] = "full timed out"
                            if not any(m == "sampled" for m, _, _ in runs):
                                runs.append(("sampled", None, sampled_s))
                        elif row["status"].startswith("timeout"):
                            row["mode"], exhausted = "timeout", "ran out of time"
                        elif row["status"] != "ok":
                            row["mode"] = "failed"
                    else:
                        row["status"] = status
                    row["load_end"] = os.getloadavg()[0]
                    rows.append(row)
                    if writer:
                        writer.writerow(row)
                        fh.flush()
                    _print_row(row)
                    if exhausted:
                        break
    finally:
        if fh:
            fh.close()
    return rows


def _print_row(r: dict) -> None:
    if r.get("s_per_token") in (None, ""):
        print(f"    -> {r['status']}; peak RSS {_mib(r.get('peak_rss_bytes'))} MiB", flush=True)
        return
    print(f"    -> {r['mode']}: {r['s_per_token'] * 1e6:,.1f} µs/token ({r['pieces_run']} pieces, "
          f"{r['prefill_s']:,.1f} s), decode step {r['decode_step_s'] * 1e3:,.2f} ms, peak RSS "
          f"{_mib(r['run_peak_rss_bytes'])} MiB ({_mib(r['peak_rss_bytes'])} with compiles), piece temporaries "
          f"{_mib(r['piece_temp_bytes'])} MiB; "
          f"load {r['load_start']:.1f}-{r['load_end']:.1f}", flush=True)


def _mib(x) -> str:
    return "—" if x in (None, "") else f"{float(x) / 2**20:,.0f}"


# ----------------------------------------------------------------------------- reading and plotting


def read_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a CSV written by ``sweep``, numbers parsed (empty cells become None)."""
    ints = {"context", "piece", "pieces_run", "run_peak_rss_bytes", "peak_rss_bytes", "cache_bytes", "kv_cache_bytes",
            "recurrent_bytes", "piece_temp_bytes"}
    text = {"model", "size", "mode", "status"}

    def parse(k, v):
        if k in text:
            return v
        if v == "":
            return None
        return int(float(v)) if k in ints else float(v)

    with open(path, newline="") as fh:
        return [{k: parse(k, v) for k, v in r.items()} for r in csv.DictReader(fh)]


def summary(rows: list[dict]) -> dict:
    """Per model: the largest context prefilled in full and sampled, the first out of memory,
    decode step at the largest context over its 256-token step, and sampled/full checks."""
    out = {}
    for key in dict.fromkeys((r["model"], r["size"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["size"]) == key]
        ok = [r for r in rs if r["mode"] in ("full", "sampled")]
        full = [r for r in ok if r["mode"] == "full"]
        first = min(ok, key=lambda r: r["context"]) if ok else None
        last = max(ok, key=lambda r: r["context"]) if ok else None
        checks = []
        for r in full:
            twin = [s for s in ok if s["mode"] == "sampled" and s["context"] == r["context"]]
            if twin:
                checks.append((r["context"], twin[0]["s_per_token"] / r["s_per_token"]))
        out[f"{key[0]}-{key[1]}"] = dict(
            max_full=max((r["context"] for r in full), default=None),
            max_any=None if last is None else last["context"],
            oom=min((r["context"] for r in rs if r["mode"] == "oom"), default=None),
            timeout=min((r["context"] for r in rs if r["mode"] == "timeout"), default=None),
            decode_ratio=None if last is None else (last["decode_step_s"] / first["decode_step_s"], first["context"],
                                                    last["context"]),
            sampled_over_full=checks,
        )
    return out


def plot(rows: list[dict], path: pathlib.Path | None = None):
    """Three log-log panels against context: prefill seconds per token, peak RSS, decode step.
    Colour: family; line style: size; filled marker: full prefill; hollow: sampled; x: out of memory."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    panels = (("s_per_token", 1e6, "prefill µs per token"),
              ("run_peak_rss_bytes", 2**-30, "peak RSS during prefill and decode, GiB"),
              ("decode_step_s", 1e3, "decode step after the prefill, ms"))
    for ax, (key, scale, title) in zip(axes, panels):
        for model, size in dict.fromkeys((r["model"], r["size"]) for r in rows):
            rs = [r for r in rows if r["model"] == model and r["size"] == size and r["mode"] in ("full", "sampled")]
            rs.sort(key=lambda r: (r["context"], r["mode"] != "full"))
            best = {}
            for r in rs:  # one point per context on the line: the full run where there is one
                best.setdefault(r["context"], r)
            pts = sorted(best.values(), key=lambda r: r["context"])
            color, ls = FAMILY_COLORS.get(model, "gray"), SIZE_STYLES.get(size, ":")
            ax.loglog([r["context"] for r in pts], [r[key] * scale for r in pts], color=color, ls=ls)
            for r in rs:
                ax.loglog([r["context"]], [r[key] * scale], ls="none", marker="o", ms=5, mec=color,
                          mfc=color if r["mode"] == "full" else "none")
            for r in rows:
                if r["model"] == model and r["size"] == size and r["mode"] in RAN_OUT and key == "run_peak_rss_bytes":
                    ax.loglog([r["context"]], [r["peak_rss_bytes"] * scale], ls="none", marker=RAN_OUT[r["mode"]],
                              ms=10, mew=2, color=color)
        ax.set_title(title)
        ax.set_xlabel("context (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    families = list(dict.fromkeys(r["model"] for r in rows))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    axes[0].legend([reporting.line(FAMILY_COLORS.get(f, "gray")) for f in families]
                   + [reporting.line(ls=SIZE_STYLES.get(s, ":")) for s in sizes],
                   families + sizes, fontsize=8, loc="upper left")
    axes[1].legend([reporting.point(), reporting.point(filled=False)] + [reporting.point(m, mew=2) for m in RAN_OUT.values()],
                   ["full prefill", "sampled (last pieces)", "out of memory (its peak)", "out of time (its peak)"],
                   fontsize=8, loc="upper left")
    return reporting.finish(fig, "long contexts: prefill in pieces, batch 1, float32, random weights", path)


def report(rows: list[dict]) -> None:
    """Prints the tables (µs per token, peak RSS, decode step and cache split per model and
    context) and the summary."""
    contexts = sorted({r["context"] for r in rows})
    head = " | ".join(_ctx(c) for c in contexts)
    keys = list(dict.fromkeys((r["model"], r["size"]) for r in rows))
    for key, label, fmt in (("s_per_token", "prefill µs/token", lambda r: f"{r['s_per_token'] * 1e6:,.1f}"),
                            ("run_peak_rss_bytes", "peak RSS MiB, prefill and decode",
                             lambda r: _mib(r["run_peak_rss_bytes"])),
                            ("peak_rss_bytes", "peak RSS MiB, whole child (compiles included)",
                             lambda r: _mib(r["peak_rss_bytes"])),
                            ("decode_step_s", "decode step ms", lambda r: f"{r['decode_step_s'] * 1e3:,.2f}")):
        print(f"\n| {label} | {head} |\n|---|" + "---|" * len(contexts))
        for model, size in keys:
            cells = []
            for c in contexts:
                rs = [r for r in rows if (r["model"], r["size"], r["context"]) == (model, size, c)]
                done = [r for r in rs if r["mode"] in ("full", "sampled") and r[key] is not None]
                done.sort(key=lambda r: r["mode"] != "full")
                if done:
                    cells.append(fmt(done[0]) + ("" if done[0]["mode"] == "full" else " (s)"))
                elif any(r["mode"] in RAN_OUT for r in rs):
                    out = [r for r in rs if r["mode"] in RAN_OUT][0]
                    label = "OOM" if out["mode"] == "oom" else "time-out"
                    cells.append(label + (f" ({_mib(out['peak_rss_bytes'])})" if "rss" in key else ""))
                else:
                    cells.append("—")
            print(f"| {model}-{size} | " + " | ".join(cells) + " |")
    print(f"\n| cache MiB (KV / recurrent) | {head} |\n|---|" + "---|" * len(contexts))
    for model, size in keys:
        by_c = {r["context"]: r for r in rows if (r["model"], r["size"]) == (model, size)}
        cells = [f"{by_c[c]['kv_cache_bytes'] / 2**20:,.1f} / {by_c[c]['recurrent_bytes'] / 2**20:,.2f}"
                 if c in by_c else "—" for c in contexts]
        print(f"| {model}-{size} | " + " | ".join(cells) + " |")
    print("\n(s) = sampled: the last pieces over a full-size synthetic cache")
    for model, s in summary(rows).items():
        ratio = s["decode_ratio"]
        checks = ", ".join(f"{_ctx(c)}: {x:.2f}x" for c, x in s["sampled_over_full"]) or "none"
        decode = "—" if ratio is None else f"{ratio[0]:.2f}x ({_ctx(ratio[2])} over {_ctx(ratio[1])})"
        print(f"{model}: full prefill up to {_ctx(s['max_full'])}, measured up to {_ctx(s['max_any'])}, "
              f"out of memory at {_ctx(s['oom'])}, out of time at {_ctx(s['timeout'])}; decode step {decode}; "
              f"sampled/full per token {checks}")


def _ctx(c) -> str:
    if c is None:
        return "—"
    for unit, n in (("M", 2**20), ("K", 2**10)):
        if c >= n and c % n == 0:
            return f"{c // n}{unit}"
    return str(c)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="preset:size entries")
    p.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    p.add_argument("--piece", type=int, default=512, help="tokens per prefill call")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--full-budget-s", type=float, default=900, help="run the full prefill when predicted below this")
    p.add_argument("--recurrent-full-budget-s", type=float, default=1200,
                   help="the same for models without attention layers")
    p.add_argument("--sample-budget-s", type=float, default=600, help="time limit of a sampled case predicted above it")
    p.add_argument("--memory-limit-gb", type=float, default=14, help="address-space limit of each child")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="OUT.csv and OUT.png (default experiments/long_context; with --quick, in the temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="transformer tiny at 512 (full) and 1024 (sampled): the pipeline")
    p.add_argument("--plot-only", action="store_true", help="tables and plot from OUT.csv, measuring nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child_main(json.loads(args.child))
        return
    if args.decode_steps < 2 or args.piece < 1:
        raise ValueError(f"--decode-steps must be >= 2 (the first is a warm-up) and --piece >= 1, got "
                         f"{args.decode_steps} and {args.piece}")
    if args.out is None:
        args.out = pathlib.Path(tempfile.gettempdir()) / "long_context_quick" if args.quick else HERE / "long_context"
    if args.quick:
        # Two children: 512 in full, then 1024 sampled (a zero budget rules out its full prefill).
        args.models, args.contexts, args.piece, args.decode_steps = ["transformer:tiny"], [512, 1024], 256, 2
        args.full_budget_s = args.recurrent_full_budget_s = 0.0
    csv_path, png = args.out.with_suffix(".csv"), args.out.with_suffix(".png")
    if not args.plot_only:
        print(f"device: {jax.devices()[0].device_kind}; {os.cpu_count()} CPUs; piece {args.piece}; "
              f"memory limit {args.memory_limit_gb} GB per child; load average {os.getloadavg()}", flush=True)
        for spec in args.models:
            name, size = spec.split(":")
            config = preset(name, size)
            one, big = cache_bytes(config, 1), cache_bytes(config, 2**20 + 1)
            print(f"{spec}: layers {''.join(m for m, _ in config.layer_kinds())}; recurrent state "
                  f"{one['recurrent']:,} B (any context); KV cache {(big['kv'] - one['kv']) / 2**20:,.0f} B per "
                  f"token", flush=True)
        start = time.perf_counter()
        sweep(args.models, args.contexts, args.piece, args.decode_steps, args.full_budget_s,
              args.recurrent_full_budget_s, args.sample_budget_s, int(args.memory_limit_gb * GIB), csv_path)
        print(f"swept in {time.perf_counter() - start:.0f} s; load average {os.getloadavg()}", flush=True)
    reporting.report_and_plot(csv_path, png, read_rows, report, plot)


if __name__ == "__main__":
    main()
