"""Packing documents into rows of seq_len + 1 tokens, in a deterministic, resumable order.

The documents of epoch e are read in order (shuffled by a numpy Generator seeded with
(seed, e), or in corpus order without shuffle) and laid end to end into an endless stream; step
s takes the next batch_size * (seq_len + 1) tokens of it as batch_size rows. A document that does
not fit continues at the start of the next row, and epochs follow each other in the stream.
Within a row every document piece gets its own segment id, so no token sees another document.

The position is (step, epoch, doc, offset): the next token is token `offset` of the `doc`-th
document of epoch `epoch`. Every process packs the whole global batch (so all agree on where
documents fall) but copies only its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jaxlm.data.batch import Batch, batch_from_rows, check_state, local_rows
from jaxlm.data.corpus import Corpus, StreamingCorpus
from jaxlm.data.tokenizer import Tokenizer

DocStream = Callable[[int, int], Iterator[np.ndarray]]  # (epoch, start) -> token arrays of the epoch
CACHE_BYTES = 512 * 2**20


class TokenizedCorpus:
    """Documents of a corpus as token-id arrays, tokenized on first use and kept in memory.

    Text documents are tokenized once and cached in the smallest unsigned dtype that holds the
    vocabulary, up to CACHE_BYTES in all (later ones are tokenized again when re-read).
    Pre-tokenized documents (arrays) are returned as they are.
    """

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer):
        self.corpus, self.tokenizer = corpus, tokenizer
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0
        v = tokenizer.vocab_size
        self._dtype = np.uint8 if v <= 2**8 else np.uint16 if v <= 2**16 else np.int32

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> np.ndarray:
        tokens = self._cache.get(i)
        if tokens is not None:
            return tokens
        document = self.corpus.load(i)
        if not isinstance(document, str):
            return document
        tokens = self.tokenizer.encode(document).astype(self._dtype)
        if self._cached_bytes + tokens.nbytes <= CACHE_BYTES:
            self._cache[i] = tokens
            self._cached_bytes += tokens.nbytes
        return tokens


def indexed_stream(docs: TokenizedCorpus, seed: int, shuffle: bool) -> DocStream:
    """Epoch e: all documents, permuted by default_rng((seed, e)) when shuffle is set."""

    def stream(epoch: int, start: int) -> Iterator[np.ndarray]:
        n = len(docs)
        order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
        for j in range(start, n):
            yield docs[int(order[j])]

    return stream


def streaming_stream(corpus: StreamingCorpus, tokenizer: Tokenizer, seed: int, shuffle: bool) -> DocStream:
    """Epoch e: the stream's texts, tokenized (shuffled by the stream itself when shuffle is set)."""

    def stream(epoch: int, start: int) -> Iterator[np.ndarray]:
        for text in corpus.stream(seed if shuffle else None, epoch, start):
            yield tokenizer.encode(text)

    return stream


class PackedBatches:
    """Endless deterministic batches of packed documents (see the module docstring).

    next() gives a Batch of this process's batch_size // process_count rows, each [.., seq_len].
    """

    _STATE_KEYS = ("step", "epoch", "doc", "offset")

    def __init__(
        self,
        docs: DocStream,
        *,
        source: str,  # for messages, e.g. "data 'docs/' (train split)"
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        fingerprint: str = "",  # the documents' identity (Corpus.fingerprint), recorded by a run
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self._docs, self.source, self.tokenizer, self.fingerprint = docs, source, tokenizer, fingerprint
        self.seq_len, self.batch_size = seq_len, batch_size
        self._rows = local_rows(batch_size, process_index, process_count)
        self._step = self._epoch = self._doc = self._offset = 0
        self._open()

    @property
    def tokens_per_batch(self) -> int:
        """Tokens the global batch takes from the stream: batch_size * (seq_len + 1)."""
        return self.batch_size * (self.seq_len + 1)

    def check_size(self) -> None:
        """ValueError unless the documents hold at least one global batch of tokens."""
        total = 0
        for tokens in self._docs(0, 0):
            total += len(tokens)
            if total >= self.tokens_per_batch:
                return
        self._too_small(total)

    def _too_small(self, total: int) -> None:
        what = "is empty (no tokens)" if total == 0 else f"holds only {total} tokens"
        raise ValueError(
            f"{self.source} {what}, fewer than one batch needs: batch_size * (seq_len + 1) = "
            f"{self.batch_size} * {self.seq_len + 1} = {self.tokens_per_batch}"
        )

    def _open(self) -> None:
        """Restart reading at document self._doc of epoch self._epoch."""
        self._iter = self._docs(self._epoch, self._doc)
        self._current: np.ndarray | None = None
        self._whole_epoch = self._doc == 0 and self._offset == 0
        self._epoch_tokens = 0

    def _fetch(self) -> np.ndarray:
        """The document holding the next token (moving to the next epoch at the end of one)."""
        while True:
            tokens = next(self._iter, None)
            if tokens is None:
                if self._whole_epoch and self._epoch_tokens < self.tokens_per_batch:
                    self._too_small(self._epoch_tokens)
                self._epoch, self._doc, self._offset = self._epoch + 1, 0, 0
                self._open()
                continue
            self._epoch_tokens += len(tokens)
            if self._offset < len(tokens):
                return tokens
            self._doc, self._offset = self._doc + 1, 0  # empty document

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> Batch:
        width = self.seq_len + 1
        lo, hi = self._rows[0] * width, self._rows[1] * width  # this process's part of the stream
        ids = np.zeros(hi - lo, np.int64)
        pieces = np.zeros(hi - lo, np.int64)
        filled, piece = 0, 0
        while filled < self.tokens_per_batch:
            if self._current is None:
                self._current = self._fetch()
            take = min(len(self._current) - self._offset, self.tokens_per_batch - filled)
            a, b = max(filled, lo), min(filled + take, hi)
            if a < b:
                start = self._offset + a - filled
                ids[a - lo : b - lo] = self._current[start : start + b - a]
                pieces[a - lo : b - lo] = piece
            filled, piece, self._offset = filled + take, piece + 1, self._offset + take
            if self._offset == len(self._current):
                self._current, self._doc, self._offset = None, self._doc + 1, 0
        self._step += 1
        rows, pieces = ids.reshape(-1, width), pieces.reshape(-1, width)
        if rows.size and rows.max() >= self.tokenizer.vocab_size:
            raise ValueError(
                f"{self.source} holds token id {rows.max()}, outside the tokenizer's vocab_size "
                f"{self.tokenizer.vocab_size} ({self.tokenizer.spec!r}); pass the tokenizer that made the ids"
            )
        return batch_from_rows(rows, pieces - pieces[:, :1])

    def state(self) -> dict[str, Any]:
        """{"step", "epoch", "doc", "offset"}: JSON-able ints."""
        return {"step": self._step, "epoch": self._epoch, "doc": self._doc, "offset": self._offset}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from state() of an iterator built with the same arguments)."""
        values = check_state(state, self._STATE_KEYS)
        self._step, self._epoch, self._doc, self._offset = (values[k] for k in self._STATE_KEYS)
        self._open()
