"""Data for training: corpora, tokenizers, packing into rows with segment ids, synthetic MQAR.

    from jaxlm import data
    batches = data.build("default", "byte", seq_len=256, batch_size=8, seed=0)
    batch = next(batches)          # Batch(tokens, targets, segment_ids, loss_mask), each [8, 256]
    saved = batches.state()        # JSON-able; batches.restore(saved) continues exactly
    evaluation = data.validation_batches("default", "byte", seq_len=256, batch_size=8, num_batches=4)
    tok = data.load_tokenizer(batches.tokenizer.spec)   # the same tokenizer, e.g. in generate

Files: api (build, validation_batches), sources (data specs), corpus (documents and the split),
default_corpus, text_files, token_files (.bin), hf (streamed datasets), tokenizer, packing,
mqar, batch (Batch and the iterator interface).
"""

from jaxlm.data.api import build, resolve_tokenizer, validation_batches
from jaxlm.data.batch import Batch, BatchIterator, local_rows
from jaxlm.data.corpus import VALIDATION_FRACTION, Corpus, StreamingCorpus, split_fraction, split_indices
from jaxlm.data.mqar import MQARBatches, MQARConfig, mqar_rows
from jaxlm.data.packing import PackedBatches
from jaxlm.data.sources import DATA_FORMS, load_corpus
from jaxlm.data.tokenizer import (
    TOKENIZER_FORMS,
    ByteTokenizer,
    HFTokenizer,
    IdTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "DATA_FORMS", "TOKENIZER_FORMS", "VALIDATION_FRACTION", "Batch", "BatchIterator", "ByteTokenizer",
    "Corpus", "HFTokenizer", "IdTokenizer", "MQARBatches", "MQARConfig", "PackedBatches",
    "StreamingCorpus", "Tokenizer", "build", "load_corpus", "load_tokenizer", "local_rows", "mqar_rows",
    "resolve_tokenizer", "split_fraction", "split_indices", "train_bpe", "validation_batches",
]
