"""The entry points the trainer calls: build() for batches, validation_batches() for evaluation."""

from __future__ import annotations

import os

import numpy as np

from jaxlm.data.batch import Batch
from jaxlm.data.corpus import Corpus, check_split, split_spec
from jaxlm.data.mqar import MQARBatches, MQARConfig
from jaxlm.data.packing import PackedBatches, TokenizedCorpus, indexed_stream, streaming_stream
from jaxlm.data.sources import canonical_data_spec, load_corpus
from jaxlm.data.tokenizer import IdTokenizer, Tokenizer, load_tokenizer


def resolve_tokenizer(tokenizer: str, data: str, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """load_tokenizer, where a bare "bpe:<n>" means BPE trained on `data` itself."""
    if tokenizer.startswith("bpe:") and tokenizer.count(":") == 1:
        tokenizer = f"{tokenizer}:{canonical_data_spec(data)}"
    return load_tokenizer(tokenizer, cache_dir=cache_dir)


def build(
    data: str = "default",
    tokenizer: str | None = None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    split: str = "train",
    shuffle: bool | None = None,
    process_index: int = 0,
    process_count: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> PackedBatches | MQARBatches:
    """An endless deterministic iterator of Batch ([batch_size // process_count, seq_len] arrays).

    data: a data spec (jaxlm.data.DATA_FORMS): "default", a text file/folder/glob, a .bin file,
      "hf:<owner>/<dataset>" or "mqar".
    tokenizer: a tokenizer spec (jaxlm.data.TOKENIZER_FORMS); None means "byte", or for mqar
      "ids:<vocab_size>" (mqar accepts no other). "bpe:<n>" trains on `data`.
    batch_size: the global batch; this process gets rows [p*b, (p+1)*b), b = batch_size // process_count.
    seed: integer >= 0; fixes the document order of every epoch (and the MQAR draws).
    split: "train", "validation" (about 2% of documents, chosen by a stable hash of their
      names) or "all".
    shuffle: shuffle documents each epoch; default True for train and all, False for validation.
    cache_dir: where trained BPE tokenizers are kept (default ~/.cache/jaxlm/tokenizers).

    The result has .tokenizer, .seq_len, .batch_size, .fingerprint (the documents' identity: it
    changes when they do), state() and restore(state). An empty
    corpus or one with fewer tokens than batch_size * (seq_len + 1) raises ValueError here
    (for a streamed dataset, at the first batch).
    """
    check_split(split)
    for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    seq_len, batch_size, seed = int(seq_len), int(batch_size), int(seed)
    shuffle = split != "validation" if shuffle is None else shuffle
    if not isinstance(data, str):
        raise ValueError(f"data must be a string spec, got {data!r}")

    base, options = split_spec(data)
    if base == "mqar":
        config = MQARConfig.from_options(options, data)
        if tokenizer not in (None, f"ids:{config.vocab_size}"):
            raise ValueError(
                f"tokenizer must be None (or 'ids:{config.vocab_size}') for data {data!r}: "
                f"MQAR makes its own token ids; got {tokenizer!r}"
            )
        return MQARBatches(
            config, seq_len=seq_len, batch_size=batch_size, seed=seed, split=split,
            process_index=process_index, process_count=process_count, source=data,
        )

    tok = resolve_tokenizer("byte" if tokenizer is None else tokenizer, data, cache_dir)
    if isinstance(tok, IdTokenizer):
        raise ValueError(f"tokenizer {tok.spec!r} is for synthetic tasks; data {data!r} needs a text tokenizer")
    corpus = load_corpus(data, split, row_len=seq_len + 1)
    source = f"data {data!r} ({split} split)"
    if isinstance(corpus, Corpus):
        stream = indexed_stream(TokenizedCorpus(corpus, tok), seed, shuffle)
    else:
        stream = streaming_stream(corpus, tok, seed, shuffle)
    batches = PackedBatches(
        stream, source=source, tokenizer=tok, seq_len=seq_len, batch_size=batch_size,
        process_index=process_index, process_count=process_count, fingerprint=corpus.fingerprint,
    )
    if isinstance(corpus, Corpus):
        batches.check_size()
    return batches


def validation_batches(
    data: str = "default",
    tokenizer: str | None = None,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> list[Batch]:
    """The first `num_batches` batches of the validation split, in corpus order (no shuffle).

    The same list on every call, so evaluations are comparable; if the split holds fewer
    tokens than num_batches batches, it is read again from the start. seed matters only for MQAR.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    batches = build(
        data, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, split="validation",
        shuffle=False, process_index=process_index, process_count=process_count, cache_dir=cache_dir,
    )
    return [next(batches) for _ in range(num_batches)]
