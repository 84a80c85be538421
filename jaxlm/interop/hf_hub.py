"""Checkpoints from the Hugging Face Hub by name: ``load_from_hub("HuggingFaceTB/SmolLM2-135M")``.

``download`` fetches only what ``jaxlm.interop.hf.load`` reads (config.json, the safetensors files
and their index) and the tokenizer.json that ``jaxlm.data.load_tokenizer`` reads, through
``huggingface_hub.snapshot_download`` and its cache (huggingface_hub ships with transformers and
with Colab; it is not a jaxlm dependency). ``hub_reachable`` answers within a bounded time whether
the Hub can be reached, so that a notebook offline or in CI skips its online part instead of
hanging on a download.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

from jax.sharding import Mesh

from jaxlm.interop import hf
from jaxlm.models import LM

HUB_URL = "https://huggingface.co"
FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json")
OFFLINE_ENV = "HF_HUB_OFFLINE"  # huggingface_hub's own switch: set, the Hub counts as unreachable


def hub_reachable(url: str = HUB_URL, timeout_s: float = 3.0) -> bool:
    """Whether ``url`` answers an HTTP HEAD request (any status counts: the host answered) within
    ``timeout_s`` seconds, name resolution and proxies (the usual *_proxy variables) included.
    False at once when HF_HUB_OFFLINE is set to a true value. The probe runs in a daemon thread,
    so a stalled lookup never holds the caller past ``timeout_s``."""
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            answered.set()
        except urllib.error.HTTPError:  # a status the server sent: it is reachable
            answered.set()
        except (OSError, ValueError):  # no route, no name, refused, timed out, a bad URL
            pass

    thread = threading.Thread(target=probe, name="hub_reachable", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answered.is_set()


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
             local_files_only: bool = False) -> Path:
    """The local folder of ``repo_id`` (e.g. "HuggingFaceTB/SmolLM2-135M") at ``revision``, holding
    FILES, fetched into huggingface_hub's cache (``cache_dir``, default its own) unless already there;
    with ``local_files_only`` only the cache is read."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must name a Hub repository as 'owner/name', got {repo_id!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("downloading from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub") \
            from None
    return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(FILES),
                                  local_files_only=local_files_only))


def load_from_hub(repo_id: str, dtype: str = "float32", mesh: Mesh | None = None, *, revision: str | None = None,
                  cache_dir: str | Path | None = None, local_files_only: bool = False) -> tuple[LM, Path]:
    """(the LM, its local folder): ``download`` then ``jaxlm.interop.hf.load`` in ``dtype`` on
    ``mesh``. The folder also holds the repository's tokenizer.json when it has one."""
    folder = download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    return hf.load(folder, dtype, mesh), folder
