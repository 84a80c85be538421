"""Data specs: from a string such as "default", "docs/", "train.bin#eot=50256" to a corpus."""

from __future__ import annotations

import os

from jaxlm.data.corpus import Corpus, StreamingCorpus, check_split, split_spec
from jaxlm.data.default_corpus import load_default
from jaxlm.data.hf import load_hf
from jaxlm.data.text_files import is_glob, load_text_files
from jaxlm.data.token_files import load_token_file

DATA_FORMS = """accepted data specs:
  default                          the Python standard library + pydoc topics (no download)
  default#max_bytes=<n>            the same, capped at n bytes
  mqar[#vocab_size=8192,num_kv_pairs=8,power_a=0.01]   synthetic multi-query associative recall
  <file>.bin[#dtype=uint16|uint32,eot=<id>]            pre-tokenized token ids (numpy memmap)
  hf:<owner>/<dataset>[#config=<name>,column=text,buffer=10000]   Hugging Face dataset, streamed
  <file> | <folder> | <glob>       text files, each file one document (folders recursively)"""


def is_path_spec(base: str) -> bool:
    return base not in ("default", "mqar") and not base.startswith("hf:")


def canonical_data_spec(spec: str) -> str:
    """`spec` with file paths made absolute, so that it means the same from any directory."""
    base, options = split_spec(spec)
    if not is_path_spec(base):
        return spec
    suffix = "#" + ",".join(f"{k}={v}" for k, v in options.items()) if options else ""
    return os.path.abspath(os.path.expanduser(base)) + suffix


def load_corpus(spec: str, split: str = "train", *, row_len: int | None = None) -> Corpus | StreamingCorpus:
    """The documents of `split` ("train", "validation" or "all") of a data spec.

    row_len: seq_len + 1, used only by .bin files without end-of-text ids (see token_files).
    Raises ValueError for a spec of no accepted form, listing the forms.
    """
    check_split(split)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data must be a non-empty string, got {spec!r}\n{DATA_FORMS}")
    base, options = split_spec(spec)
    if base == "default":
        return load_default(options, split, spec)
    if base.startswith("hf:"):
        return load_hf(base[len("hf:"):], options, split, spec)
    if base == "mqar":
        raise ValueError(f"data {spec!r} is a synthetic task, not a corpus; build it with jaxlm.data.build")
    path = os.path.expanduser(base)
    if path.endswith(".bin") and os.path.isfile(path):
        return load_token_file(path, options, split, spec, row_len)
    if os.path.exists(path) or is_glob(path):
        return load_text_files(path, options, split, spec)
    raise ValueError(f"data {spec!r}: no such file or folder, and not a known spec\n{DATA_FORMS}")
