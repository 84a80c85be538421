"""Text sources: one file, a folder (recursive) or a glob pattern; each file is one document.

In folders and glob matches, a file counts as text when it is not empty, not hidden (no name
part starting with '.') and has no NUL byte in its first 8 KiB; anything else is skipped. A file
named directly is read unless it has such a NUL byte: then it is refused as binary (token ids
belong in a `.bin` file). Files are decoded as UTF-8 with invalid bytes replaced, when a
document is first needed. Document names are paths relative to the folder (or to the pattern's
fixed leading folder), with '/' separators, so the split does not depend on where the data lives.

Split: two or more documents split by name (corpus.split_indices). A source of one document (a
single file, or a folder or pattern holding one) is split inside it instead, so that it has a
validation split: its last VALIDATION_FRACTION (2%) of characters, but at least
MIN_VALIDATION_CHARS and at most half of them, are validation and the rest is train. The cut
depends on the text's length alone, so it is the same on every run and machine.
"""

from __future__ import annotations

import glob
import math
import os

from jaxlm.data.corpus import VALIDATION_FRACTION, Corpus, check_split, fingerprint_of, parse_options, split_indices

_SNIFF_BYTES = 8192
MIN_VALIDATION_CHARS = 4096  # a one-document source's validation part: one batch of 8 x 257 bytes and more


def is_glob(spec: str) -> bool:
    return glob.has_magic(spec)


def looks_like_text(path: str) -> bool:
    """Not empty and no NUL byte in the first 8 KiB."""
    if os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        return b"\0" not in f.read(_SNIFF_BYTES)


def _walk(folder: str) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, f) for f in files if not f.startswith(".")]
    return found


def _glob_root(pattern: str) -> str:
    """The longest leading folder of `pattern` without glob characters."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def list_text_files(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """(root, sorted [(name, path)]) of the text files a file, folder or glob spec names."""
    if os.path.isfile(spec):
        return os.path.dirname(spec) or ".", [(os.path.basename(spec), spec)]
    if os.path.isdir(spec):
        root, candidates = spec, _walk(spec)
    elif is_glob(spec):
        root, candidates = _glob_root(spec), []
        for match in glob.glob(spec, recursive=True):
            candidates += _walk(match) if os.path.isdir(match) else [match]
    else:
        raise FileNotFoundError(spec)
    named = {
        os.path.relpath(path, root).replace(os.sep, "/"): path
        for path in candidates
        if os.path.isfile(path) and looks_like_text(path)
    }
    return root, sorted(named.items())


def validation_cut(n_chars: int) -> int:
    """Where a one-document source of `n_chars` characters splits: text[:cut] is train and
    text[cut:] validation (see the module docstring)."""
    n_validation = min(max(math.ceil(n_chars * VALIDATION_FRACTION), MIN_VALIDATION_CHARS), n_chars // 2)
    return n_chars - n_validation


def load_text_files(spec: str, options: dict[str, str], split: str, source: str) -> Corpus:
    """The text files named by `spec` (no options), restricted to `split`."""
    parse_options(options, {}, source)
    check_split(split)
    if os.path.isfile(spec) and os.path.getsize(spec) and not looks_like_text(spec):
        raise ValueError(
            f"data {source!r}: {spec} looks binary (a NUL byte in its first {_SNIFF_BYTES} bytes), not like text; "
            "if it holds token ids, name it *.bin (uint16 ids) or *.uint32.bin (uint32 ids)"
        )
    _, files = list_text_files(spec)
    if not files:
        raise ValueError(
            f"data {source!r}: no text files found (files must be non-empty, not hidden, "
            f"and have no NUL byte in their first {_SNIFF_BYTES} bytes)"
        )
    names = tuple(name for name, _ in files)
    paths = tuple(path for _, path in files)
    sizes = tuple(os.path.getsize(p) for p in paths)

    def load(i: int) -> str:
        with open(paths[i], "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    if len(files) == 1:
        # One document cannot be split by name: cut it. The fingerprint says so, so that nothing
        # cached for the whole file (a BPE tokenizer trained on its train split) is taken for it.
        def part(i: int) -> str:
            text = load(i)
            cut = validation_cut(len(text))
            return {"train": text[:cut], "validation": text[cut:], "all": text}[split]

        return Corpus(source, names, part, fingerprint_of("text", names, sizes, "one document, cut"))
    corpus = Corpus(source, names, load, fingerprint_of("text", names, sizes))
    return corpus.select(split_indices(names, split))
