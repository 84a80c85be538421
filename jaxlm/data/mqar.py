"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (Arora et al., 2023).

A row of seq_len + 1 tokens holds, with K = num_kv_pairs and V = vocab_size:
- positions 0 .. 2K-1: K key-value pairs k_0 v_0 k_1 v_1 ..., keys distinct and drawn from
  [0, V/2), values distinct and drawn from [V/2, V), so the two ranges never overlap;
- after them, S = (seq_len + 1 - 2K) // 2 two-token slots. Each key is queried once, in a slot
  of its own: the key at the slot's first position, its value at the second. The K slots are
  drawn without replacement with probability proportional to a·s^(a-1) for the slot's distance
  s = 1..S from the key-value block (power_a = a, 0.01 by default), so most queries come soon
  and a few come far away; which key goes into which chosen slot is uniformly random;
- every other position holds a uniformly random token of [0, V), as noise.
As everywhere, inputs are row[:-1] and targets row[1:]; loss_mask is 1 exactly at the queried
keys, whose target is the value to recall. The whole row is one segment. (Zoology leaves noise
in the input right after a query key; here the value stands there, so targets stay the inputs
shifted by one. A causal model cannot see it before it has to predict it.)

Batches are a pure function of (seed, split, step): step s uses default_rng((seed, split, s)),
so state is just the step, and the validation split draws from a different stream than train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxlm.data.batch import Batch, batch_from_rows, check_state, local_rows
from jaxlm.data.corpus import fingerprint_of, parse_options
from jaxlm.data.tokenizer import IdTokenizer

_SPLIT_STREAMS = {"train": 0, "all": 0, "validation": 1}


@dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 8192
    num_kv_pairs: int = 8
    power_a: float = 0.01

    @classmethod
    def from_options(cls, options: dict[str, str], source: str) -> MQARConfig:
        return cls(**parse_options(options, {"vocab_size": int, "num_kv_pairs": int, "power_a": float}, source))

    def check(self, seq_len: int, source: str = "mqar") -> None:
        """ValueError unless keys, values and queries fit the vocabulary and the row."""
        k, v = self.num_kv_pairs, self.vocab_size
        if k < 1:
            raise ValueError(f"data {source!r}: num_kv_pairs must be at least 1, got {k}")
        if v // 2 < k:
            raise ValueError(f"data {source!r}: vocab_size must be at least 2 * num_kv_pairs = {2 * k}, got {v}")
        if seq_len + 1 < 4 * k:
            raise ValueError(
                f"data {source!r}: seq_len must be at least 4 * num_kv_pairs - 1 = {4 * k - 1} "
                f"(pairs, then one query slot per key), got {seq_len}"
            )
        if not self.power_a > 0:
            raise ValueError(f"data {source!r}: power_a must be positive, got {self.power_a}")


def mqar_rows(rng: np.random.Generator, rows: int, seq_len: int, config: MQARConfig) -> tuple[np.ndarray, np.ndarray]:
    """MQAR rows [rows, seq_len + 1] int32 and answer mask [rows, seq_len] bool (see module doc)."""
    k, v = config.num_kv_pairs, config.vocab_size
    width = seq_len + 1
    slots = (width - 2 * k) // 2
    distance = np.arange(1, slots + 1, dtype=np.float64)
    p = config.power_a * distance ** (config.power_a - 1)
    p /= p.sum()
    out = rng.integers(0, v, size=(rows, width), dtype=np.int64)  # noise everywhere first
    answers = np.zeros((rows, seq_len), dtype=bool)
    for r in range(rows):
        keys = rng.choice(v // 2, size=k, replace=False)
        values = v // 2 + rng.choice(v - v // 2, size=k, replace=False)
        out[r, 0 : 2 * k : 2], out[r, 1 : 2 * k : 2] = keys, values
        query_at = 2 * k + 2 * rng.choice(slots, size=k, replace=False, p=p)
        pair = rng.permutation(k)
        out[r, query_at], out[r, query_at + 1] = keys[pair], values[pair]
        answers[r, query_at] = True
    return out.astype(np.int32), answers


class MQARBatches:
    """Endless MQAR batches; next() gives this process's batch_size // process_count rows."""

    def __init__(
        self,
        config: MQARConfig,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        split: str = "train",
        process_index: int = 0,
        process_count: int = 1,
        source: str = "mqar",
    ):
        config.check(seq_len, source)
        self.config, self.source = config, source
        self.fingerprint = fingerprint_of("mqar", config)  # the draws depend on nothing else but the seed
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.tokenizer = IdTokenizer(config.vocab_size)
        self._stream = _SPLIT_STREAMS[split]
        self._rows = local_rows(batch_size, process_index, process_count)
        self._step = 0

    def __iter__(self) -> MQARBatches:
        return self

    def __next__(self) -> Batch:
        rng = np.random.default_rng((self.seed, self._stream, self._step))
        rows, answers = mqar_rows(rng, self.batch_size, self.seq_len, self.config)
        self._step += 1
        mine = slice(*self._rows)
        return batch_from_rows(rows[mine], np.zeros_like(rows[mine]), answers[mine])

    def state(self) -> dict[str, Any]:
        return {"step": self._step}

    def restore(self, state: dict[str, Any]) -> None:
        self._step = check_state(state, ("step",))["step"]
