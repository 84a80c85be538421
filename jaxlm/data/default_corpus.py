"""The default corpus: the running Python's own standard library and its pydoc topics.

Why this text. Every machine that can install jaxlm already holds it, so training works with no
download, on an offline TPU host or a fresh Colab alike, and nothing has to be licensed or
mirrored. It is about 12 MB of real, varied text: Python code with docstrings and comments, and
English reference prose (the language reference topics that `help("if")` shows), which is
enough for a small model to learn visible structure within minutes.

What exactly is in it:
- `pydoc/<topic>`: each entry of `pydoc_data.topics.topics`, one document per topic;
- `stdlib/<relative path>`: each `*.py` file under `sysconfig.get_paths()["stdlib"]`, except
  those under `site-packages`, `dist-packages` and `__pycache__`, and except test suites
  (folders named `test`, `tests`, `idle_test`). Test suites are left out because many
  distributions ship them as a separate package (Debian's libpython3-testsuite), so leaving
  them out keeps the corpus the same on every install of one Python version, and because they
  hold deliberately malformed text. `pydoc_data/topics.py` is left out too: its topics are
  already in, as prose.

Documents are sorted by name and taken in that order while their UTF-8 size stays within
`max_bytes` (16 MiB by default), so the corpus is deterministic and reading it takes a fraction
of a second. The corpus depends on the Python version; its fingerprint records the version.
Files are decoded as UTF-8 with invalid bytes replaced.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig

from jaxlm.data.corpus import Corpus, fingerprint_of, parse_options, split_indices

DEFAULT_MAX_BYTES = 16 * 2**20
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_SKIPPED_FILES = frozenset({"pydoc_data/topics.py"})


def stdlib_files() -> list[tuple[str, str]]:
    """(name, path) of the standard-library sources in the corpus, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith(".")]
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                if rel not in _SKIPPED_FILES:
                    found.append(("stdlib/" + rel, path))
    return sorted(found)


def pydoc_topics() -> list[tuple[str, str]]:
    """(name, text) of the pydoc documentation topics, sorted by name (empty if not shipped)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return sorted(("pydoc/" + key, text) for key, text in topics.items() if text.strip())


@functools.lru_cache(maxsize=4)
def _documents(max_bytes: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names and texts of the corpus, sorted by name, capped at max_bytes of UTF-8."""
    candidates: list[tuple[str, str | None, str | None]] = [
        (name, text, None) for name, text in pydoc_topics()
    ] + [(name, None, path) for name, path in stdlib_files()]
    candidates.sort(key=lambda c: c[0])
    names, texts, total = [], [], 0
    for name, text, path in candidates:
        if text is None:
            with open(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8", errors="replace")
            size = len(raw)
        else:
            size = len(text.encode("utf-8"))
        if size == 0 or not text.strip():
            continue
        if total + size > max_bytes:
            break
        names.append(name)
        texts.append(text)
        total += size
    return tuple(names), tuple(texts)


def load_default(options: dict[str, str], split: str, source: str = "default") -> Corpus:
    """The default corpus (options: max_bytes=<int>), restricted to `split`."""
    max_bytes = parse_options(options, {"max_bytes": int}, source).get("max_bytes", DEFAULT_MAX_BYTES)
    if max_bytes <= 0:
        raise ValueError(f"data {source!r}: max_bytes must be positive, got {max_bytes}")
    names, texts = _documents(max_bytes)
    if not names:
        raise ValueError(
            f"data {source!r}: found no standard-library sources under "
            f"{sysconfig.get_paths()['stdlib']!r} and no pydoc topics"
        )
    sizes = tuple(len(t) for t in texts)
    corpus = Corpus(
        source=source,
        names=names,
        load=lambda i: texts[i],
        fingerprint=fingerprint_of("default", sys.version_info[:2], names, sizes),
    )
    return corpus.select(split_indices(names, split))
