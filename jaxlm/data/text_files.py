"""Text sources: one file, a folder (recursive) or a glob pattern; each file is one document.

In folders and glob matches, a file counts as text when it is not empty, not hidden (no name
part starting with '.') and has no NUL byte in its first 8 KiB; anything else is skipped. A file
named directly is always read. Files are decoded as UTF-8 with invalid bytes replaced, when a
document is first needed. Document names are paths relative to the folder (or to the pattern's
fixed leading folder), with '/' separators, so the split does not depend on where the data lives.
"""

from __future__ import annotations

import glob
import os

from jaxlm.data.corpus import Corpus, fingerprint_of, parse_options, split_indices

_SNIFF_BYTES = 8192


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


def load_text_files(spec: str, options: dict[str, str], split: str, source: str) -> Corpus:
    """The text files named by `spec` (no options), restricted to `split`."""
    parse_options(options, {}, source)
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

    corpus = Corpus(source, names, load, fingerprint_of("text", names, sizes))
    return corpus.select(split_indices(names, split))
