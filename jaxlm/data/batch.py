"""The batch the trainer consumes, the iterator interface, and the split of rows over processes.

Dimension letters: B rows in this process's part of the batch, T = seq_len.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from jaxlm.data.tokenizer import Tokenizer


class Batch(NamedTuple):
    """One batch of packed rows, all numpy arrays of shape [B, T].

    tokens: int32 input ids. targets: int32 ids to predict, tokens shifted left by one.
    segment_ids: int32 document of each input token within its row, 0, 1, 2, ... along the
    row (a change marks a new document; pass it to the ops' `segment_ids`). loss_mask: float32,
    1 where the target continues the input token's document (MQAR: only the answers).
    """

    tokens: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray


@runtime_checkable
class BatchIterator(Protocol):
    """An endless, deterministic iterator of Batch whose position can be saved and restored.

    state() is a JSON-able dict of ints; restore(state) makes the iterator continue exactly as
    the one that produced the state would have.
    """

    tokenizer: Tokenizer
    seq_len: int
    batch_size: int  # global: rows over all processes

    def __iter__(self) -> BatchIterator: ...

    def __next__(self) -> Batch: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


def batch_from_rows(rows: np.ndarray, segments: np.ndarray, answers: np.ndarray | None = None) -> Batch:
    """Batch from rows [B, T+1] of ids and their segments [B, T+1].

    answers [B, T] bool, if given, is the loss mask (synthetic tasks); otherwise the mask is 1
    where input and target lie in the same segment.
    """
    mask = segments[:, :-1] == segments[:, 1:] if answers is None else answers
    return Batch(
        tokens=np.ascontiguousarray(rows[:, :-1], dtype=np.int32),
        targets=np.ascontiguousarray(rows[:, 1:], dtype=np.int32),
        segment_ids=np.ascontiguousarray(segments[:, :-1], dtype=np.int32),
        loss_mask=mask.astype(np.float32),
    )


def local_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of this process's rows of the global batch: contiguous equal blocks.

    Process p holds rows p*B/P ... (p+1)*B/P - 1, the layout that
    jax.make_array_from_process_local_data expects for a batch sharded over processes.
    """
    if process_count < 1:
        raise ValueError(f"process_count must be at least 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size (global) must be a positive multiple of process_count={process_count}, got {batch_size}"
        )
    per_process = batch_size // process_count
    return process_index * per_process, (process_index + 1) * per_process


def check_state(state: dict[str, Any], keys: tuple[str, ...]) -> dict[str, int]:
    """The state's values as ints; ValueError unless it has exactly `keys`, each an int >= 0."""
    if not isinstance(state, dict) or set(state) != set(keys):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state must be a dict with keys {sorted(keys)}, got {got}")
    values = {}
    for key in keys:
        value = state[key]
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"state[{key!r}] must be an int >= 0, got {value!r}")
        values[key] = int(value)
    return values
