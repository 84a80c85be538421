"""Cached attention of one prefill piece over a long cache, one shot against blocks of keys.

  python experiments/bench_key_blocks.py [--slots 65536] [--piece 512] [--key-blocks 1000000 1024 512 256]

For each key block size (a size at least the cache's runs the scores in one shot) the script jits
``ops.attention.xla.masked_attention`` on a piece of queries at the end of a full cache (heads 4,
head dim 32, float32), prints the best of 3 calls and the compiled temporaries, and checks every
size against the first.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.ops.attention import xla as attention_xla


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=65536, help="cache slots, all written and visible")
    p.add_argument("--piece", type=int, default=512, help="queries in the piece")
    p.add_argument("--key-blocks", type=int, nargs="+", default=[1_000_000, 1024, 512, 256])
    args = p.parse_args(argv)
    s_len, t, heads, dim = args.slots, args.piece, 4, 32
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, t, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, heads, s_len, dim)), jnp.float32) for _ in range(2))
    q_pos, k_pos = jnp.arange(s_len - t, s_len), jnp.arange(s_len)
    q_doc, k_doc = jnp.zeros((1, t), jnp.int32), jnp.zeros((1, s_len), jnp.int32)
    first = None
    for block in args.key_blocks:
        fn = jax.jit(lambda q, k, v, block=block: attention_xla.masked_attention(
            q, k, v, q_pos, q_doc, k_pos, k_doc, scale=dim**-0.5, window=None, key_block_size=block))
        out = fn(q, k, v).block_until_ready()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn(q, k, v).block_until_ready()
            times.append(time.perf_counter() - start)
        temp = fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
        first = out if first is None else first
        print(f"slots {s_len}, piece {t}, key block {block}: {min(times) * 1e3:,.0f} ms, temporaries "
              f"{temp / 2**20:,.0f} MiB, max |difference| from the first {float(jnp.max(jnp.abs(out - first))):.1e}",
              flush=True)


if __name__ == "__main__":
    main()
