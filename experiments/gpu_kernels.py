"""GPU check and benchmark of the Pallas linear-recurrence kernels (and, through
experiments/gpu_attention.py, the flash-attention kernel).

  python experiments/gpu_kernels.py [--quick] [--interpret] [--repeats 5] [--budget-s 270]
                                    [--num-warps 4] [--block-v 64] [--precision tf32x3|highest]
                                    [--skip-attention] [--csv experiments/gpu_kernels.csv]

1. compile: every kernel (simple_gla, gla, gated_delta_rule), forward and forward+backward,
   through ``jaxlm.ops`` with impl="pallas"; the compile time or the error is recorded.
2. check: impl="pallas" against the float32 recurrent reference on this device (odd T, packed
   documents, grouped value heads, an initial state; float32 inputs at head dim 256 and bf16
   inputs at 128): relative RMS error of o, the final state and every gradient, against the
   numerics contract.
3. time: bf16, forward and forward+backward, at (B, T, H, D) = (4, 4096, 16, 128),
   (2, 16384, 16, 128), (8, 2048, 32, 128), for impl="pallas", impl="chunk" (XLA) and fla's
   Triton kernels when ``import fla`` works; ratios are measured side by side in this run.
   Stops starting new measurements once --budget-s seconds have passed (the rest is recorded as
   skipped), so that the whole script, attention included, stays under 8 minutes.
4. attention: ``run(csv_rows, device_name)`` of experiments/gpu_attention.py, if it exists.
Writes every row to a CSV. ``--quick --interpret`` runs tiny shapes in the Pallas interpreter,
which is how the script is smoke-tested on CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory for torch (fla)

import argparse
import csv
import importlib.util
import inspect
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import ops
from jaxlm.timing import best_seconds
from kernels_pallas import KernelSettings, kernel_settings

HERE = pathlib.Path(__file__).resolve().parent
SHAPES = [(4, 4096, 16, 128), (2, 16384, 16, 128), (8, 2048, 32, 128)]
QUICK_SHAPES = [(1, 256, 2, 32), (2, 128, 2, 16)]
FIELDS = ["bench", "device", "op", "B", "T", "H", "D", "dtype", "variant", "pass", "seconds",
          "speedup_vs_chunk", "speedup_vs_fla", "rel_rms", "tolerance", "ok", "note"]
# Numerics contract: (outputs and states, dq/dk/dv/d initial state, dg/dbeta) by input dtype.
TOLERANCES = {"float32": (1e-5, 1e-4, 1e-4), "bfloat16": (5e-3, 8e-3, 2e-2)}
BENCH_OPS = ("simple_gla", "gla", "gated_delta_rule")


def _row(device: str, **values: Any) -> dict:
    return {field: values.get(field) for field in FIELDS} | {"bench": "recurrence", "device": device}


def compare(a, b, tol: float) -> tuple[float, bool]:
    """Relative RMS error rms(a − b) / (rms(b) + 1e-8), and whether it passes the contract: within
    tol, or max |a − b| <= 1e-6 outright, with every value finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-8))
    ok = bool(np.isfinite(a).all()) and (err <= tol or float(np.max(np.abs(a - b))) <= 1e-6)
    return err, ok


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


# ---------------------------------------------------------------- inputs and op calls


def make_inputs(b: int, t: int, h: int, hv: int, d: int, dtype, seed: int = 0) -> dict[str, jax.Array]:
    """Layer-like inputs: unit-norm keys, log-sigmoid gates, sigmoid write strengths."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    k = jax.random.normal(ks[1], (b, t, h, d))
    x = dict(
        q=jax.random.normal(ks[0], (b, t, h, d)),
        k=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        v=jax.random.normal(ks[2], (b, t, hv, d)),
        g=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[3], (b, t, hv))),
        gk=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[4], (b, t, hv, d))),
        beta=jax.nn.sigmoid(jax.random.normal(ks[5], (b, t, hv))),
    )
    x = {n: a.astype(dtype) for n, a in x.items()}
    x["s0"] = 0.1 * jax.random.normal(ks[6], (b, hv, d, d))
    return x


# op -> (call(x, impl, **common) -> (o, S), the inputs it differentiates)
OPS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "linear_attn": (lambda x, **kw: ops.linear_attn(x["q"], x["k"], x["v"], **kw), ("q", "k", "v")),
    "simple_gla": (lambda x, **kw: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], **kw), ("q", "k", "v", "g")),
    "gla": (lambda x, **kw: ops.gla(x["q"], x["k"], x["v"], x["gk"], **kw), ("q", "k", "v", "gk")),
    "delta_rule": (lambda x, **kw: ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw), ("q", "k", "v", "beta")),
    "gated_delta_rule": (
        lambda x, **kw: ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw),
        ("q", "k", "v", "g", "beta"),
    ),
}


def jitted(op: str, impl: str, with_state: bool = False) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of an op, jitted. The backward differentiates every float input
    (and the initial state when ``with_state``) of sum(o·w) + sum(S·w_S)."""
    call, names = OPS[op]
    names = (*names, "s0") if with_state else names
    common = dict(impl=impl, output_final_state=True)

    def forward(x, segment_ids=None):
        init = x["s0"] if with_state else None
        return call(x, initial_state=init, segment_ids=segment_ids, **common)

    def loss(diff, rest, segment_ids):
        o, s = forward({**rest, **diff}, segment_ids)
        wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
        ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws), (o, s)

    def forward_backward(x, segment_ids=None):
        diff = {n: x[n] for n in names}
        rest = {n: a for n, a in x.items() if n not in names}
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(diff, rest, segment_ids)
        return out, grads

    return jax.jit(forward), jax.jit(forward_backward)


# ---------------------------------------------------------------- 1. compile, 2. check


def compile_all(rows: list, device: str, d: int) -> set[str]:
    """Compiles each kernel's forward and forward+backward; returns the ops that compiled."""
    ok_ops = set()
    x = make_inputs(1, 256, 2, 2, d, jnp.bfloat16)
    for op in BENCH_OPS:
        fwd, fwd_bwd = jitted(op, "pallas")
        ok = True
        for pass_name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            start = time.perf_counter()
            try:
                fn.lower(x).compile()
                note = f"compiled in {time.perf_counter() - start:.1f} s"
            except Exception as exc:  # noqa: BLE001 - a kernel that fails to lower is reported, not fatal
                ok, note = False, _short(exc)
            rows.append(_row(device, op=op, B=1, T=256, H=2, D=d, dtype="bfloat16", variant="pallas",
                             **{"pass": f"compile_{pass_name}"}, ok=ok, note=note))
            print(f"compile {op:17s} {pass_name:7s} {'ok  ' if ok else 'FAIL'} {note}")
        if ok:
            ok_ops.add(op)
    return ok_ops


def check_cases(quick: bool) -> list[tuple[str, Any, int]]:
    """(op, input dtype, head dim) pairs: every op in float32; the kernels' largest head dim (256)
    in float32 and bf16 inputs at 128 for the timed ops (linear_attn and delta_rule share their
    kernels with simple_gla and gated_delta_rule)."""
    small, large = (16, 32) if quick else (128, 256)
    cases = [(op, jnp.float32, large if op in BENCH_OPS else small) for op in OPS]
    return cases + [(op, jnp.bfloat16, small) for op in BENCH_OPS]


def check(rows: list, device: str, quick: bool, compiled: set[str]) -> bool:
    """impl="pallas" against impl="recurrent" on float32 inputs, on this device. True if every
    output, state and gradient is within the numerics contract."""
    b, t, h, hv = (2, 77, 1, 2) if quick else (2, 333, 1, 2)
    cut = [t // 3, t // 3 + 1, t - t // 3 - 1 - t // 3]
    seg = jnp.asarray(np.repeat(np.arange(3), cut)[None].repeat(b, 0), jnp.int32)
    families = {"linear_attn": "simple_gla", "delta_rule": "gated_delta_rule"}
    all_ok = True
    for op, dtype, d in check_cases(quick):
        if families.get(op, op) not in compiled:
            continue
        x = make_inputs(b, t, h, hv, d, dtype, seed=1)
        x_ref = {n: a.astype(jnp.float32) for n, a in x.items()}
        common = dict(op=op, B=b, T=t, H=hv, D=d, dtype=jnp.dtype(dtype).name, variant="pallas")
        try:
            (o_ref, s_ref), g_ref = jitted(op, "recurrent", with_state=True)[1](x_ref, seg)
            (o, s), grads = jitted(op, "pallas", with_state=True)[1](x, seg)
        except Exception as exc:  # noqa: BLE001 - e.g. a head dim the device cannot compile
            all_ok = False
            rows.append(_row(device, **common, **{"pass": "check"}, ok=False, note=_short(exc)))
            print(f"check {op:17s} {jnp.dtype(dtype).name:8s} D={d:3d} FAIL {_short(exc)}")
            continue
        tol_out, tol_grad, tol_gate = TOLERANCES[jnp.dtype(dtype).name]
        compared = [("o", o, o_ref, tol_out), ("S", s, s_ref, tol_out)]
        compared += [(f"d{n}", grads[n], g_ref[n], tol_gate if n in ("g", "gk", "beta") else tol_grad) for n in grads]
        errors = []
        for name, got, want, tol in compared:
            err, ok = compare(got, want, tol)
            all_ok &= ok
            errors.append(f"{name} {err:.1e}{'' if ok else ' FAIL'}")
            rows.append(_row(device, **common, **{"pass": f"check_{name}"}, rel_rms=err, tolerance=tol, ok=ok,
                             note=f"vs impl=recurrent float32; H={h} HV={hv}, 3 documents, initial state"))
        print(f"check {op:17s} {jnp.dtype(dtype).name:8s} D={d:3d} " + ", ".join(errors))
    return all_ok


# ---------------------------------------------------------------- 3. timing


def _fla_function(op: str) -> Callable | None:
    """fla's chunked Triton kernel for an op, or None when fla is not installed."""
    try:
        if op == "simple_gla":
            from fla.ops.simple_gla import chunk_simple_gla as fn
        elif op == "gla":
            from fla.ops.gla import chunk_gla as fn
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn
    except Exception:  # noqa: BLE001 - fla or torch missing, or built for another platform
        return None
    return fn


def _fla_timings(op: str, b: int, t: int, h: int, d: int, repeats: int) -> tuple[float, float]:
    """Best forward and forward+backward seconds of fla's kernel, bf16, torch on CUDA."""
    import torch
    import torch.nn.functional as F

    fn = _fla_function(op)
    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, device=dev, dtype=bf16) for _ in range(3))
    k = F.normalize(k.float(), dim=-1).to(bf16)
    gate_shape = (b, t, h, d) if op == "gla" else (b, t, h)
    g = F.logsigmoid(3.0 + torch.randn(gate_shape, device=dev)).to(bf16)
    args = [q, k, v, g]
    if op == "gated_delta_rule":
        args.append(torch.sigmoid(torch.randn(b, t, h, device=dev)).to(bf16))
    kwargs = {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}
    for a in args:
        a.requires_grad_(True)
    do = torch.randn_like(v)

    def forward():
        with torch.no_grad():
            fn(*args, **kwargs)

    def forward_backward():
        for a in args:
            a.grad = None
        o = fn(*args, **kwargs)[0]
        o.backward(do)

    def best(f):
        f()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(forward), best(forward_backward)


def _jax_timings(op: str, impl: str, x: dict, repeats: int) -> tuple[float, float]:
    fwd, fwd_bwd = jitted(op, impl)
    return best_seconds(fwd, x, repeats=repeats), best_seconds(fwd_bwd, x, repeats=repeats)


def time_all(rows: list, device: str, shapes, repeats: int, budget_s: float, start: float,
             compiled: set[str], with_fla: bool) -> None:
    for b, t, h, d in shapes:
        x = make_inputs(b, t, h, h, d, jnp.bfloat16)
        for op in BENCH_OPS:
            variants: dict[str, Callable[[], tuple[float, float]]] = {}
            if op in compiled:
                variants["pallas"] = lambda op=op: _jax_timings(op, "pallas", x, repeats)
            variants["jaxlm_chunk"] = lambda op=op: _jax_timings(op, "chunk", x, repeats)
            if with_fla and _fla_function(op) is not None:
                variants["fla"] = lambda op=op: _fla_timings(op, b, t, h, d, repeats)
            times: dict[str, tuple[float, float]] = {}
            for name, measure in variants.items():
                common = dict(op=op, B=b, T=t, H=h, D=d, dtype="bfloat16", variant=name)
                if time.perf_counter() - start > budget_s:
                    note = f"time budget {budget_s:.0f} s spent"
                    rows.append(_row(device, **common, **{"pass": "skipped"}, note=note))
                    continue
                try:
                    times[name] = measure()
                except Exception as exc:  # noqa: BLE001 - out of memory or a missing backend skips one variant
                    print(f"  skip {op} {name} at B={b} T={t} H={h} D={d}: {_short(exc)}")
                    rows.append(_row(device, **common, **{"pass": "skipped"}, note=_short(exc)))
            for name, pair in times.items():
                for index, pass_name in enumerate(("fwd", "fwd_bwd")):
                    seconds = pair[index]
                    vs_chunk, vs_fla = (
                        times[other][index] / seconds if other in times and other != name else None
                        for other in ("jaxlm_chunk", "fla")
                    )
                    rows.append(_row(device, op=op, B=b, T=t, H=h, D=d, dtype="bfloat16", variant=name,
                                     **{"pass": pass_name}, seconds=seconds, speedup_vs_chunk=vs_chunk,
                                     speedup_vs_fla=vs_fla))
                    ratios = "".join(f"  {r:5.2f}x vs {n}" for r, n in ((vs_chunk, "chunk"), (vs_fla, "fla")) if r)
                    print(f"  B={b} T={t:5d} H={h:2d} D={d} {op:17s} {name:11s} {pass_name:7s} "
                          f"{seconds * 1e3:9.3f} ms{ratios}")


# ---------------------------------------------------------------- 4. attention, main


def run_attention(rows: list, device: str, quick: bool, interpret: bool, repeats: int) -> None:
    path = HERE / "gpu_attention.py"
    if not path.exists():
        print("attention: experiments/gpu_attention.py not found; skipped")
        return
    spec = importlib.util.spec_from_file_location("gpu_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = inspect.signature(module.run).parameters
    options = dict(quick=quick, interpret=True if interpret else None, repeats=repeats)
    module.run(rows, device, **{n: v for n, v in options.items() if n in params})


def write_csv(rows: list, path: pathlib.Path) -> None:
    fields = FIELDS + sorted({key for row in rows for key in row} - set(FIELDS))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, two repeats")
    p.add_argument("--interpret", action="store_true", help="run the Pallas kernels in interpret mode")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=270.0, help="no new recurrence timing after this")
    p.add_argument("--num-warps", type=int, default=None, help="Triton warps per program")
    p.add_argument("--block-v", type=int, default=None, help="value columns per program (default 64 on GPU)")
    p.add_argument("--precision", choices=("tf32x3", "highest"), default=None, help="in-kernel matmuls on GPU")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--csv", type=pathlib.Path, default=HERE / "gpu_kernels.csv")
    args = p.parse_args(argv)

    changes: dict[str, Any] = {}
    if args.interpret:
        changes["interpret"] = True
    if args.num_warps:
        changes["num_warps"] = args.num_warps
    if args.block_v:
        changes["block_v"] = args.block_v
    if args.precision:
        changes["precision"] = {"tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
                                "highest": jax.lax.Precision.HIGHEST}[args.precision]
    with kernel_settings(**changes) as settings:
        run_all(args, settings)


def run_all(args: argparse.Namespace, settings: KernelSettings) -> None:
    """Every part of the benchmark, under the kernel settings in effect."""
    start = time.perf_counter()
    device = jax.devices()[0].device_kind
    shapes, repeats = (QUICK_SHAPES, min(args.repeats, 2)) if args.quick else (SHAPES, args.repeats)
    with_fla = jax.default_backend() == "gpu" and _fla_function("simple_gla") is not None
    print(f"== linear recurrences on {device} (jax {jax.__version__}, settings {settings}) ==")
    if not with_fla:
        print("fla: not importable here (or not on a GPU); its columns are skipped")
    rows: list[dict] = []
    compiled = compile_all(rows, device, shapes[0][3])
    if not check(rows, device, args.quick, compiled):
        print("WARNING: a kernel is outside the numerics contract on this device; timings follow anyway")
    time_all(rows, device, shapes, repeats, args.budget_s, start, compiled, with_fla)
    print(f"recurrences done in {time.perf_counter() - start:.0f} s")
    write_csv(rows, args.csv)
    if not args.skip_attention:
        try:
            run_attention(rows, device, args.quick, args.interpret, repeats)
        except Exception as exc:  # noqa: BLE001 - the attention half must not lose the recurrence rows
            print(f"attention: failed with {_short(exc)}")
        write_csv(rows, args.csv)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
