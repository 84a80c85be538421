"""What a data source loads into: named documents, a stable train/validation split, spec options.

A source is either indexed (`Corpus`: a fixed list of named documents, each loaded on demand as
text or as token ids) or streamed (`StreamingCorpus`: an iterator of texts that can be shuffled
and resumed, such as a Hugging Face dataset).

The split is decided per document by a stable hash of its name (BLAKE2b, never Python's salted
`hash()`; documents of .bin files by a stable hash of their index), so it is the same on every
machine and a document keeps its side when others are added. A text source of a single document
has no second document to split from, so text_files cuts that one document in two instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "validation", "all")
VALIDATION_FRACTION = 0.02

Document = str | np.ndarray  # a text, or a 1-D array of token ids for pre-tokenized sources


@dataclass(frozen=True)
class Corpus:
    """A fixed list of named documents.

    source: the data spec, for messages. names: one stable name per document, in the
    deterministic document order. load(i): document i, as text or as a 1-D token-id array.
    fingerprint: changes when the documents do (keys tokenizer caches).
    """

    source: str
    names: Sequence[str]
    load: Callable[[int], Document]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.names)

    def select(self, indices: Sequence[int] | np.ndarray) -> Corpus:
        """The sub-corpus of documents `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        load = self.load
        return Corpus(
            source=self.source,
            names=SelectedNames(self.names, indices),
            load=lambda i: load(int(indices[i])),
            fingerprint=self.fingerprint,
        )


class SelectedNames(Sequence):
    """names[indices[i]] for each i, without copying (corpora may hold millions of documents)."""

    def __init__(self, names: Sequence[str], indices: np.ndarray):
        self._names, self._indices = names, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._names[int(self._indices[i])]


class IndexNames(Sequence):
    """The names "0", "1", ..., "n-1": documents known by their position in a file."""

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return str(i % self._n)


@dataclass(frozen=True)
class StreamingCorpus:
    """A stream of texts of unknown length.

    stream(seed, epoch, start): the texts of one epoch from document `start` on; shuffled by
    (seed, epoch) when seed is not None, in the source's own order otherwise.
    """

    source: str
    stream: Callable[[int | None, int, int], Iterator[str]]
    fingerprint: str


def split_fraction(name: str) -> float:
    """A number in [0, 1) fixed by `name` alone: the document's place in the split."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def index_fractions(indices: np.ndarray) -> np.ndarray:
    """Numbers in [0, 1) fixed by integer `indices` alone (SplitMix64), vectorized for files of
    millions of documents: the split place of document i of a .bin file."""
    z = np.asarray(indices).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def split_indices(names: Sequence[str], split: str, fractions: np.ndarray | None = None) -> np.ndarray:
    """Indices of the documents in `split` ("train", "validation" or "all").

    A document is in validation when its fraction (default: split_fraction(name)) is below
    VALIDATION_FRACTION (about 2%). When that picks none and there are at least two documents,
    the one with the smallest fraction is validation, so every corpus of two or more documents
    has both splits.
    """
    check_split(split)
    if split == "all":
        return np.arange(len(names))
    if fractions is None:
        fractions = np.array([split_fraction(n) for n in names], dtype=np.float64)
    is_val = fractions < VALIDATION_FRACTION
    if not is_val.any() and len(names) >= 2:
        is_val[np.argmin(fractions)] = True
    return np.flatnonzero(is_val if split == "validation" else ~is_val)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Separate `base#key=value,key=value` into base and options (no `#...`: no options)."""
    base, sep, tail = spec.rpartition("#")
    if not sep:
        return spec, {}
    parts = tail.split(",")
    if not all(p.count("=") == 1 and p.split("=")[0].strip() for p in parts):
        return spec, {}  # a '#' that is part of a path, not options
    return base, {k.strip(): v.strip() for k, v in (p.split("=") for p in parts)}


def parse_options(options: Mapping[str, str], accepted: Mapping[str, type], source: str) -> dict:
    """Convert spec options to the types in `accepted`; unknown keys or bad values: ValueError."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"data {source!r}: unknown option(s) {unknown}; accepted: "
            + (", ".join(f"{k}=<{t.__name__}>" for k, t in accepted.items()) or "none")
        )
    parsed = {}
    for key, value in options.items():
        try:
            parsed[key] = accepted[key](value)
        except ValueError:
            raise ValueError(
                f"data {source!r}: option {key}={value!r} must be a {accepted[key].__name__}"
            ) from None
    return parsed


def fingerprint_of(*parts: object) -> str:
    """A short stable hex digest of `parts` (their reprs)."""
    return hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).hexdigest()
