"""Scaling benchmark of every op and form against softmax attention.

  python experiments/bench_ops.py [--seq-lens 1024 2048 4096 8192 16384] [--repeats 3] [--ops ...]
      [--forms recurrent associative chunk] [--chunk-size C]
  python experiments/bench_ops.py --plot-only     # tables and plot again from bench_ops.csv

For each op and execution form it times the forward pass and forward+backward at B=1, H=4,
K=V=64 in float32 on the default device, beside XLA softmax attention, in one run. It writes
a CSV and a log-log plot of time against T, fits the scaling exponent of each curve from
T=2K to 16K, and checks the foundation issue's targets from ratios measured side by side.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import ops
from jaxlm.timing import best_seconds

HERE = pathlib.Path(__file__).resolve().parent
B, H, D = 1, 4, 64


def make_inputs(t: int) -> dict[str, jax.Array]:
    ks = jax.random.split(jax.random.PRNGKey(t), 6)
    k = jax.random.normal(ks[1], (B, t, H, D))
    return dict(
        q=jax.random.normal(ks[0], (B, t, H, D)),
        k=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        v=jax.random.normal(ks[2], (B, t, H, D)),
        g=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[3], (B, t, H))),
        gk=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[4], (B, t, H, D))),
        beta=jax.nn.sigmoid(jax.random.normal(ks[5], (B, t, H))),
    )


# op name -> (function of (inputs, **op keywords: impl, chunk_size) -> o, the inputs it differentiates)
OPS = {
    "linear_attn": (lambda x, **kw: ops.linear_attn(x["q"], x["k"], x["v"], **kw)[0], ("q", "k", "v")),
    "simple_gla": (lambda x, **kw: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], **kw)[0], ("q", "k", "v", "g")),
    "gla": (lambda x, **kw: ops.gla(x["q"], x["k"], x["v"], x["gk"], **kw)[0], ("q", "k", "v", "gk")),
    "delta_rule": (
        lambda x, **kw: ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)[0],
        ("q", "k", "v", "beta"),
    ),
    "gated_delta_rule": (
        lambda x, **kw: ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)[0],
        ("q", "k", "v", "g", "beta"),
    ),
    "kda": (
        lambda x, **kw: ops.kda(x["q"], x["k"], x["v"], x["gk"], x["beta"], **kw)[0],
        ("q", "k", "v", "gk", "beta"),
    ),
    "attention": (lambda x, **_: ops.attention(x["q"], x["k"], x["v"], causal=True), ("q", "k", "v")),
}
FORMS = ("recurrent", "associative", "chunk")
# One colour per op and one line style per form, so that no two curves look alike.
OP_COLORS = dict(zip(OPS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:cyan", "black")))
FORM_STYLES = {"recurrent": ":", "associative": "--", "chunk": "-", "xla": "-."}


FIELDS = ["op", "form", "T", "fwd_s", "fwd_bwd_s"]


def _read_rows(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [
            dict(op=r["op"], form=r["form"], T=int(r["T"]), fwd_s=float(r["fwd_s"]), fwd_bwd_s=float(r["fwd_bwd_s"]))
            for r in csv.DictReader(fh)
        ]


def build(op: str, impl: str | None, chunk_size: int | None = None):
    fn, diff = OPS[op]
    kw = dict(impl=impl) if chunk_size is None else dict(impl=impl, chunk_size=chunk_size)

    def loss(d, rest):
        return jnp.sum(fn({**rest, **d}, **kw))

    def fwd(x):
        return fn(x, **kw)

    def fwd_bwd(x):
        d = {n: x[n] for n in diff}
        return jax.grad(loss)(d, {n: a for n, a in x.items() if n not in diff})

    return jax.jit(fwd), jax.jit(fwd_bwd)


def fit_exponent(ts: list[int], secs: list[float]) -> float:
    keep = [(t, s) for t, s in zip(ts, secs) if t >= 2048]
    if len(keep) < 2:
        return float("nan")
    lt, ls = np.log([t for t, _ in keep]), np.log([s for _, s in keep])
    return float(np.polyfit(lt, ls, 1)[0])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--associative-max-len", type=int, default=8192,
        help="longest T for the associative forms: they hold a K×V (delta rules: also K×K) matrix per "
        "token at every scan level, and at T=16384 the delta rules' fwd+bwd exceeds 24 GB",
    )
    p.add_argument("--chunk-size", type=int, default=None, help="the chunk forms' chunk size; default each op's own")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "bench_ops")
    p.add_argument("--resume", action="store_true", help="keep the rows already in OUT.csv and measure only the rest")
    p.add_argument("--plot-only", action="store_true", help="measure nothing: tables and plot from OUT.csv")
    args = p.parse_args(argv)

    csv_path = args.out.with_suffix(".csv")
    if args.plot_only:
        rows = _read_rows(csv_path)
        report(rows, sorted({r["T"] for r in rows}), args.out.with_suffix(".png"))
        return
    rows = _read_rows(csv_path) if args.resume and csv_path.exists() else []
    measured = {(r["op"], r["form"], r["T"]) for r in rows}
    cases = [
        (op, impl, t)
        for op in args.ops
        for impl in (["xla"] if op == "attention" else args.forms)
        for t in args.seq_lens
        if (impl != "associative" or t <= args.associative_max_len) and (op, impl, t) not in measured
    ]
    print(f"device: {jax.devices()[0].device_kind}; B={B} H={H} K=V={D} float32; {len(rows)} rows kept", flush=True)
    # Rows are written as they come, so a long run that is stopped keeps what it measured.
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        fh.flush()
        built = {}
        for done, (op, impl, t) in enumerate(cases, 1):
            if (op, impl) not in built:
                chunk_size = args.chunk_size if impl == "chunk" else None
                built[(op, impl)] = build(op, None if impl == "xla" else impl, chunk_size)
            fwd, fwd_bwd = built[(op, impl)]
            x = make_inputs(t)
            fwd_s = best_seconds(fwd, x, repeats=args.repeats)
            row = dict(op=op, form=impl, T=t, fwd_s=fwd_s, fwd_bwd_s=best_seconds(fwd_bwd, x, repeats=args.repeats))
            rows.append(row)
            writer.writerow(row)
            fh.flush()
            print(
                f"[{done}/{len(cases)}] {op:17s} {impl:12s} T={t:6d}  fwd {row['fwd_s'] * 1e3:9.1f} ms  "
                f"fwd+bwd {row['fwd_bwd_s'] * 1e3:9.1f} ms",
                flush=True,
            )
    report(rows, args.seq_lens, args.out.with_suffix(".png"))
    print(f"\nwrote {csv_path} and {args.out.with_suffix('.png')}")


def report(rows: list[dict], seq_lens: list[int], png: pathlib.Path) -> None:
    """Prints the exponent and time tables and the targets, and writes the plot."""
    curves = {}
    for r in rows:
        curves.setdefault((r["op"], r["form"]), []).append(r)
    print("\n| op | form | fwd exponent | fwd+bwd exponent |\n|---|---|---|---|")
    for (op, impl), rs in curves.items():
        ts = [r["T"] for r in rs]
        print(f"| {op} | {impl} | {fit_exponent(ts, [r['fwd_s'] for r in rs]):.2f} | "
              f"{fit_exponent(ts, [r['fwd_bwd_s'] for r in rs]):.2f} |")

    for key, label in (("fwd_s", "forward ms"), ("fwd_bwd_s", "forward+backward ms")):
        print(f"\n| {label} | form | " + " | ".join(f"T={t}" for t in seq_lens) + " |")
        print("|---|---|" + "---|" * len(seq_lens))
        for (op, impl), rs in curves.items():
            by_t = {r["T"]: r[key] for r in rs}
            cells = [f"{by_t[t] * 1e3:.1f}" if t in by_t else "—" for t in seq_lens]
            print(f"| {op} | {impl} | " + " | ".join(cells) + " |")

    _targets(curves)
    _plot(curves, png)


def _lookup(curves, op, impl, t, key="fwd_bwd_s"):
    for r in curves.get((op, impl), []):
        if r["T"] == t:
            return r[key]
    return None


def _targets(curves) -> None:
    print("\nTargets (ratios from this run):")
    for op in ("gated_delta_rule", "kda"):
        rec, chunk = _lookup(curves, op, "recurrent", 4096), _lookup(curves, op, "chunk", 4096)
        if rec and chunk:
            print(f"  {op} chunk vs recurrent, T=4096 fwd+bwd: {rec / chunk:.1f}x faster (target >= 4x)")
        rs = curves.get((op, "chunk"), [])
        if len(rs) >= 2:
            exponent = fit_exponent([r["T"] for r in rs], [r["fwd_bwd_s"] for r in rs])
            print(f"  {op} chunk fwd+bwd exponent 2K-16K: {exponent:.2f} (target <= 1.15)")
    ts = [r["T"] for r in curves.get(("gated_delta_rule", "chunk"), [])]
    att = curves.get(("attention", "xla"), [])
    if att:
        ta = [r["T"] for r in att]
        print(f"  attention fwd+bwd exponent 2K-16K: {fit_exponent(ta, [r['fwd_bwd_s'] for r in att]):.2f} (expected near 2)")
    t_max = max(ts, default=0)
    a, c = _lookup(curves, "attention", "xla", t_max), _lookup(curves, "gated_delta_rule", "chunk", t_max)
    if a and c:
        print(f"  gated_delta_rule chunk vs softmax attention, T={t_max} fwd+bwd: {a / c:.1f}x faster (target >= 2x)")


def _plot(curves, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot written", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, key, title in ((axes[0], "fwd_s", "forward"), (axes[1], "fwd_bwd_s", "forward + backward")):
        for (op, impl), rs in curves.items():
            width = 2.5 if op == "attention" else 1.5
            ax.loglog([r["T"] for r in rs], [r[key] for r in rs], FORM_STYLES[impl], color=OP_COLORS[op],
                      marker="o", ms=3, lw=width)
        ax.set_title(title)
        ax.set_xlabel("sequence length T")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds")
    # Two legends, because colour and line style each carry one thing: colour the op, style the form.
    from matplotlib.lines import Line2D

    ops_seen = list(dict.fromkeys(op for op, _ in curves))
    forms_seen = list(dict.fromkeys(impl for _, impl in curves))
    axes[0].legend([Line2D([], [], color=OP_COLORS[op], lw=2) for op in ops_seen], ops_seen,
                   title="op", fontsize=8, loc="upper left")
    axes[1].legend([Line2D([], [], color="gray", ls=FORM_STYLES[f], lw=2) for f in forms_seen], forms_seen,
                   title="form", fontsize=8, loc="upper left", handlelength=3)
    fig.suptitle(f"jaxlm ops on {jax.devices()[0].device_kind}: B={B}, H={H}, K=V={D}, float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
