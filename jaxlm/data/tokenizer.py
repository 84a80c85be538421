"""Tokenizers behind one small interface, each rebuilt from its `spec` string by load_tokenizer.

Specs:
- "byte": UTF-8 bytes, vocab 256 (the default);
- "bpe:<vocab_size>" or "bpe:<vocab_size>:<data spec>": byte-level BPE trained with the
  Hugging Face `tokenizers` library on the train split of the data (the default corpus when no
  data is named), cached as a tokenizer.json file;
- "<path>.json": any Hugging Face tokenizer.json file;
- "ids:<vocab_size>": token ids written as decimal numbers, for synthetic tasks such as MQAR.

The BPE is GPT-2 style byte-level (any text round-trips exactly), with one special token,
"<|endoftext|>" (id 0). Training is deterministic, reads at most 64 MiB of the data, and is
cached under `cache_dir` (default ~/.cache/jaxlm/tokenizers) as `<key>.json`, where the key
hashes the data spec, the documents' fingerprint and vocab_size.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from jaxlm.data.corpus import Corpus, fingerprint_of

TOKENIZER_FORMS = """accepted tokenizer specs:
  byte                            UTF-8 bytes, vocab 256
  bpe:<vocab_size>                byte-level BPE trained on the data (cached)
  bpe:<vocab_size>:<data spec>    the same, trained on the named data
  <path>.json                     a Hugging Face tokenizer.json file
  ids:<vocab_size>                decimal token ids (synthetic tasks)"""

END_OF_TEXT = "<|endoftext|>"
BPE_MAX_TRAIN_BYTES = 64 * 2**20
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxlm", "tokenizers")


@runtime_checkable
class Tokenizer(Protocol):
    """spec rebuilds the tokenizer through load_tokenizer(spec); ids lie in [0, vocab_size)."""

    spec: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """[N] int32 token ids of `text`."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids`; never raises on invalid UTF-8 or unknown ids."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens. decode replaces invalid UTF-8 and ids outside [0, 256) by U+FFFD."""

    spec = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = np.where((ids >= 0) & (ids < 256), ids, 0xFF).astype(np.uint8)  # 0xFF is never valid UTF-8
        return data.tobytes().decode("utf-8", errors="replace")


class IdTokenizer:
    """Token ids as space-separated decimal numbers (for synthetic tasks with no text)."""

    def __init__(self, vocab_size: int):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.spec = f"ids:{vocab_size}"

    def encode(self, text: str) -> np.ndarray:
        try:
            ids = np.array([int(t) for t in text.split()], dtype=np.int64)
        except ValueError:
            raise ValueError(f"{self.spec} encodes whitespace-separated integers, got {text[:50]!r}") from None
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"{self.spec}: ids must lie in [0, {self.vocab_size}), got {text[:50]!r}")
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer`; encode adds no special tokens.

    path: the tokenizer.json file it was read from (copy it next to a checkpoint to keep it).
    """

    def __init__(self, path: str, spec: str):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = path
        self.spec = spec
        self._tokenizer = _Tokenizer.from_file(path)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def _training_texts(corpus, max_bytes: int) -> Iterator[str]:
    """Texts of a corpus in document order, until max_bytes of UTF-8 have been given."""
    texts = (corpus.load(i) for i in range(len(corpus))) if isinstance(corpus, Corpus) else corpus.stream(None, 0, 0)
    total = 0
    for text in texts:
        yield text
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            return


def train_bpe(vocab_size: int, data: str = "default", cache_dir: str | os.PathLike | None = None) -> HFTokenizer:
    """Byte-level BPE with `vocab_size` ids trained on the train split of `data`, cached on disk."""
    from tokenizers import Tokenizer as _Tokenizer, decoders, models, pre_tokenizers, trainers

    from jaxlm.data.sources import canonical_data_spec, load_corpus

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"bpe vocab_size must be at least {len(alphabet) + 1} (256 bytes + {END_OF_TEXT}), got {vocab_size}"
        )
    data = canonical_data_spec(data)
    spec = f"bpe:{vocab_size}:{data}"
    corpus = load_corpus(data, "train")
    if isinstance(corpus, Corpus) and len(corpus) and not isinstance(corpus.load(0), str):
        raise ValueError(f"bpe trains on text, but data {data!r} holds token ids; name the tokenizer that made them")
    key = fingerprint_of("bpe-v1", data, corpus.fingerprint, vocab_size, BPE_MAX_TRAIN_BYTES)
    folder = os.path.expanduser(os.fspath(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR))
    path = os.path.join(folder, f"{key}.json")
    if not os.path.isfile(path):
        tokenizer = _Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=alphabet, show_progress=False
        )
        tokenizer.train_from_iterator(_training_texts(corpus, BPE_MAX_TRAIN_BYTES), trainer)
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as f:
            f.write(tokenizer.to_str())
        os.replace(f.name, path)  # atomic: processes training the same tokenizer do not clash
    return HFTokenizer(path, spec)


def _positive_int(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"tokenizer {spec!r}: expected a positive integer vocab size, got {text!r}\n{TOKENIZER_FORMS}")
    return int(text)


def load_tokenizer(spec: str, *, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer that `spec` names (see TOKENIZER_FORMS); `tok.spec` rebuilds the same one."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer must be a non-empty string, got {spec!r}\n{TOKENIZER_FORMS}")
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("ids:"):
        return IdTokenizer(_positive_int(spec[len("ids:"):], spec))
    if spec.startswith("bpe:"):
        size, _, data = spec[len("bpe:"):].partition(":")
        return train_bpe(_positive_int(size, spec), data or "default", cache_dir)
    if spec.endswith(".json"):
        path = os.path.abspath(os.path.expanduser(spec))
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer {spec!r}: no such file")
        return HFTokenizer(path, path)
    raise ValueError(f"unknown tokenizer {spec!r}\n{TOKENIZER_FORMS}")
