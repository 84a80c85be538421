"""A two-minute tour of jaxlm.ops on CPU: ``python -m jaxlm.demo``.

It checks, on random inputs, the lecture's central identity (causal linear attention computed
as Q(KᵀV) by the chunk form equals (QKᵀ ⊙ mask)V computed directly), that every execution form of
every recurrence agrees with the token-by-token reference, and times a training step
(forward+backward) of the chunk form against the recurrent form and softmax attention.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import ops
from jaxlm.timing import best_seconds

FORMS = ("recurrent", "associative", "chunk")


def _inputs(t: int, heads: int, dim: int, seed: int = 0) -> dict[str, jax.Array]:
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    k = jax.random.normal(ks[1], (1, t, heads, dim))
    return dict(
        q=jax.random.normal(ks[0], (1, t, heads, dim)),
        k=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        v=jax.random.normal(ks[2], (1, t, heads, dim)),
        g=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[3], (1, t, heads))),
        gk=jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[4], (1, t, heads, dim))),
        beta=jax.nn.sigmoid(jax.random.normal(ks[5], (1, t, heads))),
    )


OPS = {
    "linear_attn": lambda x, impl: ops.linear_attn(x["q"], x["k"], x["v"], impl=impl)[0],
    "simple_gla": lambda x, impl: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], impl=impl)[0],
    "gla": lambda x, impl: ops.gla(x["q"], x["k"], x["v"], x["gk"], impl=impl)[0],
    "delta_rule": lambda x, impl: ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], impl=impl)[0],
    "gated_delta_rule": lambda x, impl: ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], impl=impl)[0],
}


def _rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-8))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096, help="T for the timing comparison")
    args = parser.parse_args(argv)
    if args.seq_len < 1:
        parser.error("--seq-len must be a positive integer")

    print(f"jaxlm demo on {jax.devices()[0].platform.upper()} (jax {jax.__version__})\n")
    x = _inputs(t=100, heads=2, dim=16)
    o, _ = ops.linear_attn(x["q"], x["k"], x["v"], impl="chunk")
    scores = jnp.einsum("bthd,bshd->bhts", x["q"] * 16**-0.5, x["k"])
    direct = jnp.einsum("bhts,bshd->bthd", jnp.tril(scores), x["v"])
    print(f"Q(KᵀV) chunked vs (QKᵀ⊙M)V direct: relative error {_rel_err(o, direct):.1e}\n")

    print("Every form against the token-by-token recurrence (relative RMS error of o):")
    for name, op in OPS.items():
        reference = op(x, "recurrent")
        errors = "  ".join(f"{impl} {_rel_err(op(x, impl), reference):.1e}" for impl in FORMS[1:])
        print(f"  {name:17s} {errors}")

    t = args.seq_len
    print(f"\nForward+backward time at T={t}, 4 heads, K=V=64 (ratios measured side by side):")
    x = _inputs(t=t, heads=4, dim=64, seed=1)

    def train_step(op):
        """jit(grad) of sum(o) with respect to q, k and v: the cost of a training step."""
        loss = lambda qkv, rest: jnp.sum(op({**rest, **qkv}))  # noqa: E731
        return jax.jit(lambda x: jax.grad(loss)({n: x[n] for n in "qkv"}, x))

    t_attention = best_seconds(train_step(lambda x: ops.attention(x["q"], x["k"], x["v"], causal=True)), x)
    for name in ("simple_gla", "gated_delta_rule"):
        chunk = best_seconds(train_step(lambda x, op=OPS[name]: op(x, "chunk")), x)
        recurrent = best_seconds(train_step(lambda x, op=OPS[name]: op(x, "recurrent")), x)
        print(
            f"  {name:17s} chunk {chunk * 1e3:7.1f} ms: {recurrent / chunk:5.1f}x faster than the recurrent form, "
            f"{t_attention / chunk:5.1f}x faster than softmax attention"
        )
    print("\nNext: python -m pytest -q  (the test suite), experiments/bench_ops.py (the scaling benchmark).")


if __name__ == "__main__":
    main()
