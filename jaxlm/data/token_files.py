"""Pre-tokenized `.bin` files: a flat array of token ids, as nanoGPT and CS336 write them.

The file is opened as a read-only numpy memmap, so it is never loaded whole.
- dtype: the `dtype=uint16|uint32` option; otherwise the name decides, `*.uint32.bin` (or
  `*.u32.bin`) is uint32 and anything else uint16 (nanoGPT's and CS336's default).
- Documents: with the `eot=<id>` option the stream is cut at every end-of-text id (the id itself
  is dropped) and document i is named "i"; its split is decided by a stable integer hash of i
  (SplitMix64, vectorized, so files of millions of documents open in a moment).
  Without it the stream has no document boundaries: its last 2% is the validation split, and
  each split is cut into documents of exactly one row (seq_len + 1 tokens, the tail dropped),
  so rows are shuffled whole and never marked as document changes.
- Pre-split data: a file whose name starts with `train` and has a sibling named with `val`,
  `valid` or `validation` in place of `train` (nanoGPT's train.bin/val.bin) gives its whole self
  as the train split and the whole sibling as the validation split.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlm.data.corpus import (
    VALIDATION_FRACTION,
    Corpus,
    IndexNames,
    fingerprint_of,
    index_fractions,
    parse_options,
    split_indices,
)

_SCAN_CHUNK = 1 << 26  # tokens per pass when searching for end-of-text ids
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def infer_dtype(path: str) -> str:
    """uint32 for `*.uint32.bin` / `*.u32.bin`, uint16 otherwise."""
    name = os.path.basename(path).lower()
    return "uint32" if name.endswith((".uint32.bin", ".u32.bin")) else "uint16"


def validation_sibling(path: str) -> str | None:
    """`val.bin` (or valid/validation) beside `train.bin`, if the name fits and it exists."""
    folder, name = os.path.split(path)
    if not name.startswith("train"):
        return None
    for prefix in ("val", "valid", "validation"):
        candidate = os.path.join(folder, prefix + name[len("train"):])
        if os.path.isfile(candidate):
            return candidate
    return None


def open_tokens(path: str, dtype: str, source: str) -> np.ndarray:
    """The file as a read-only 1-D memmap of `dtype` (empty array for an empty file)."""
    size = os.path.getsize(path)
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    if size % itemsize:
        problem = f"data {source!r}: {path} has {size} bytes, not a multiple of {itemsize}, the size of a {dtype} token"
        if size % 2 == 0:  # only uint32 gets here: the size fits uint16 tokens
            raise ValueError(
                f"{problem}; if its tokens are uint16, pass dtype=uint16 (or drop .uint32 / .u32 from its name), "
                "otherwise the file was cut short: write it again"
            )
        # An odd size fits neither width: no dtype option can fix it.
        raise ValueError(
            f"{problem}: an odd size fits neither uint16 nor uint32 tokens, so the file was cut short or does not "
            "hold token ids; write it again as a flat array, np.asarray(ids, np.uint16).tofile(path) (uint32 ids: "
            "np.uint32 and a name ending in .uint32.bin)"
        )
    if size == 0:
        return np.zeros(0, _DTYPES[dtype])
    return np.memmap(path, dtype=_DTYPES[dtype], mode="r")


def document_bounds(tokens: np.ndarray, eot: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) [D] of the documents between end-of-text ids (ends exclusive)."""
    hits = [
        np.flatnonzero(tokens[lo : lo + _SCAN_CHUNK] == eot) + lo
        for lo in range(0, len(tokens), _SCAN_CHUNK)
    ]
    eots = np.concatenate(hits) if hits else np.zeros(0, np.int64)
    starts = np.concatenate([[0], eots + 1])
    ends = np.concatenate([eots, [len(tokens)]])
    return starts.astype(np.int64), ends.astype(np.int64)


def _corpus(source: str, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, fingerprint: str) -> Corpus:
    """Documents tokens[starts[i]:ends[i]], named "0", "1", ... before any selection."""
    return Corpus(source, IndexNames(len(starts)), lambda i: tokens[starts[i] : ends[i]], fingerprint)


def load_token_file(path: str, options: dict[str, str], split: str, source: str, row_len: int | None) -> Corpus:
    """The documents of `split` in a .bin file (options dtype, eot).

    row_len: tokens per row (seq_len + 1), the document length for files without `eot`; None
    makes each split of such a file one document.
    """
    opts = parse_options(options, {"dtype": str, "eot": int}, source)
    dtype = opts.get("dtype", infer_dtype(path))
    if dtype not in _DTYPES:
        raise ValueError(f"data {source!r}: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    eot = opts.get("eot")
    sibling = validation_sibling(path) if split != "all" else None
    if sibling is not None:
        path, split = (sibling if split == "validation" else path), "all"
    tokens = open_tokens(path, dtype, source)
    fingerprint = fingerprint_of("bin", os.path.abspath(path), len(tokens), dtype, eot)

    if eot is not None:
        starts, ends = document_bounds(tokens, eot)
        n = len(starts)
        keep = split_indices(IndexNames(n), split, index_fractions(np.arange(n)))
        keep = keep[ends[keep] > starts[keep]]  # drop empty documents (adjacent end-of-text ids)
        return _corpus(source, tokens, starts, ends, fingerprint).select(keep)

    n = len(tokens)
    n_train = n - int(np.ceil(n * VALIDATION_FRACTION)) if n > 1 else n
    lo, hi = {"train": (0, n_train), "validation": (n_train, n), "all": (0, n)}[split]
    if row_len is None:
        starts, ends = np.array([lo]), np.array([hi])
    else:
        starts = np.arange(lo, hi - row_len + 1, row_len, dtype=np.int64)
        ends = starts + row_len
    return _corpus(source, tokens, starts, ends, fingerprint)
