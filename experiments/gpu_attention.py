"""GPU benchmark of the Pallas flash-attention kernel beside cuDNN and XLA attention.

  python experiments/gpu_attention.py [--quick] [--interpret] [--repeats 5] [--csv out.csv]

First it checks the kernel against jaxlm's impl="xla" on the device (relative RMS error of o,
dq, dk, dv, float32 and bf16, with GQA, a window, segments and odd T) against the numerics
contract. Then it times the forward pass and forward+backward, causal, bf16, at
(B, T, H, D) = (4, 4096, 16, 128), (2, 16384, 16, 128), (8, 2048, 32, 128) for:
  pallas      kernels_pallas.flash_attention
  jaxlm_xla   jaxlm.ops.attention(impl="xla")
  cudnn       jax.nn.dot_product_attention(implementation="cudnn")
  jax_xla     jax.nn.dot_product_attention(implementation="xla")
A variant that fails (no cuDNN on the platform, out of memory) is skipped with its reason.
Throughput is causal FLOPs (forward 2·B·H·T²·D, forward+backward 3.5× that) per second, and
each variant's ratio to cuDNN is measured in the same run. --quick uses tiny shapes (and two
repeats), --interpret runs the kernel in the Pallas interpreter (for a CPU smoke run).

``run(csv_rows, device_name)`` is what experiments/gpu_kernels.py calls: it appends one dict per
measurement, all with the keys of ``FIELDS``, and prints them.
"""

from __future__ import annotations

import argparse
import csv
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import ops
from jaxlm.timing import best_seconds
from kernels_pallas.flash_attention import flash_attention

SHAPES = [(4, 4096, 16, 128), (2, 16384, 16, 128), (8, 2048, 32, 128)]
QUICK_SHAPES = [(2, 256, 4, 64), (1, 200, 4, 64)]
FIELDS = ["bench", "device", "B", "T", "H", "D", "dtype", "variant", "pass", "seconds", "tflops",
          "ratio_vs_cudnn", "rel_rms", "tolerance", "ok", "note"]
# Numerics contract (docs/architecture.md): (outputs, gradients) by input dtype.
TOLERANCES = {"float32": (1e-5, 1e-4), "bfloat16": (5e-3, 8e-3)}


def _row(device_name: str, **values) -> dict:
    return {field: values.get(field) for field in FIELDS} | {"bench": "attention", "device": device_name}


def rel_rms(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-8))


def _inputs(b: int, t: int, h: int, hk: int, d: int, dtype, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, hk, d), dtype)
    v = jax.random.normal(ks[2], (b, t, hk, d), dtype)
    return q, k, v, jax.random.normal(ks[3], (b, t, h, d), jnp.float32)


def _value_and_grads(fn: Callable, q, k, v, ct):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

    o = jax.jit(fn)(q, k, v)
    return o, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def check(csv_rows: list, device_name: str, *, quick: bool) -> bool:
    """impl="pallas" (float32 and bf16 inputs) against impl="xla" on float32 inputs, on this device.

    Appends one row per compared array; True if all are within the numerics contract.
    """
    b, t, h, hk, d = (2, 77, 4, 2, 64) if quick else (2, 1031, 8, 2, 128)
    seg = jnp.asarray(np.repeat(np.arange(4), [t // 3, 1, t // 2, t - t // 3 - 1 - t // 2])[None].repeat(b, 0))
    kwargs = dict(causal=True, window=t // 4, segment_ids=seg)
    all_ok = True
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v, ct = _inputs(b, t, h, hk, d, dtype, seed=1)
        f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
        ref_fn = lambda q, k, v: ops.attention(q, k, v, impl="xla", **kwargs)
        pallas_fn = lambda q, k, v: ops.attention(q, k, v, impl="pallas", **kwargs)
        o_ref, g_ref = _value_and_grads(ref_fn, *f32, ct)
        o, g = _value_and_grads(pallas_fn, q, k, v, ct)
        tol_o, tol_g = TOLERANCES[jnp.dtype(dtype).name]
        for name, got, want, tol in [("o", o, o_ref, tol_o)] + [
            (n, x, y, tol_g) for n, x, y in zip(("dq", "dk", "dv"), g, g_ref)
        ]:
            err = rel_rms(got, want)
            ok = bool(np.isfinite(np.asarray(got, np.float32)).all()) and err <= tol
            all_ok &= ok
            csv_rows.append(_row(device_name, B=b, T=t, H=h, D=d, dtype=jnp.dtype(dtype).name, variant="pallas",
                                 **{"pass": f"check_{name}"}, rel_rms=err, tolerance=tol, ok=ok,
                                 note=f"vs impl=xla float32, Hk={hk}, window={t // 4}, 4 segments"))
            print(f"check {jnp.dtype(dtype).name:8s} {name}: rel RMS {err:.2e} (tol {tol:g}) {'ok' if ok else 'FAIL'}")
    return all_ok


def _variants(interpret: bool | None) -> dict[str, Callable]:
    return {
        "pallas": lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=interpret),
        "jaxlm_xla": lambda q, k, v: ops.attention(q, k, v, causal=True, impl="xla"),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        "jax_xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
    }


def _timed(fn: Callable, q, k, v, repeats: int) -> tuple[float, float]:
    fwd = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    return best_seconds(fwd, q, k, v, repeats=repeats), best_seconds(grad, q, k, v, repeats=repeats)


def run(csv_rows: list, device_name: str, *, quick: bool = False, interpret: bool | None = None,
        repeats: int = 5) -> None:
    """Checks, then times every variant at every shape; appends dict rows (keys FIELDS) and prints."""
    print(f"== attention on {device_name} ==")
    if not check(csv_rows, device_name, quick=quick):
        print("WARNING: the Pallas kernel is outside the numerics contract on this device; timings follow anyway")
    shapes, repeats = (QUICK_SHAPES, min(repeats, 2)) if quick else (SHAPES, repeats)
    for b, t, h, d in shapes:
        q, k, v, _ = _inputs(b, t, h, h, d, jnp.bfloat16)
        fwd_flops = 2.0 * b * h * t * t * d  # causal: half of 4·B·H·T²·D
        times: dict[str, tuple[float, float]] = {}
        for name, fn in _variants(interpret).items():
            try:
                times[name] = _timed(fn, q, k, v, repeats)
            except Exception as exc:  # noqa: BLE001 - any failure skips the variant, with its reason
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                print(f"  skip {name} at B={b} T={t} H={h} D={d}: {reason}")
                csv_rows.append(_row(device_name, B=b, T=t, H=h, D=d, dtype="bfloat16", variant=name,
                                     **{"pass": "skipped"}, note=reason))
        for name, pair in times.items():
            for index, (pass_name, flops) in enumerate((("fwd", fwd_flops), ("fwd_bwd", 3.5 * fwd_flops))):
                seconds = pair[index]
                ratio = times["cudnn"][index] / seconds if "cudnn" in times else None
                csv_rows.append(_row(device_name, B=b, T=t, H=h, D=d, dtype="bfloat16", variant=name,
                                     **{"pass": pass_name}, seconds=seconds, tflops=flops / seconds / 1e12,
                                     ratio_vs_cudnn=ratio))
                vs = f"  x{ratio:.2f} of cuDNN" if ratio is not None else ""
                print(f"  B={b} T={t:5d} H={h} D={d} {name:9s} {pass_name:7s} {seconds * 1e3:9.3f} ms "
                      f"{flops / seconds / 1e12:7.2f} TFLOP/s{vs}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, two repeats")
    p.add_argument("--interpret", action="store_true", help="run the Pallas kernel in interpret mode")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    rows: list[dict] = []
    run(rows, jax.devices()[0].device_kind, quick=args.quick, interpret=True if args.interpret else None,
        repeats=args.repeats)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
