"""jaxlm.interop.hf_hub offline: the reachability probe against a local server, a closed port and
the offline switch, and download from huggingface_hub's cache alone."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from jaxlm.interop import hf_hub


@pytest.fixture
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reachable_when_a_server_answers(local_server, monkeypatch):
    monkeypatch.delenv(hf_hub.OFFLINE_ENV, raising=False)
    assert hf_hub.hub_reachable(local_server, timeout_s=5)
    assert hf_hub.hub_reachable(local_server + "/no-such-file", timeout_s=5)  # a 404 is an answer


def test_unreachable_within_the_timeout(monkeypatch):
    monkeypatch.delenv(hf_hub.OFFLINE_ENV, raising=False)
    start = time.perf_counter()
    assert not hf_hub.hub_reachable(f"http://127.0.0.1:{_closed_port()}", timeout_s=2)
    assert not hf_hub.hub_reachable("http://name.invalid", timeout_s=2)  # a name that never resolves
    assert time.perf_counter() - start < 4.5


def test_the_offline_switch_wins(local_server, monkeypatch):
    monkeypatch.setenv(hf_hub.OFFLINE_ENV, "1")
    assert not hf_hub.hub_reachable(local_server, timeout_s=5)
    with pytest.raises(ValueError, match="timeout_s"):
        hf_hub.hub_reachable(local_server, timeout_s=0)


def test_download_reads_the_cache_alone(tmp_path):
    """A repository already in huggingface_hub's cache layout comes back as its snapshot folder."""
    pytest.importorskip("huggingface_hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    folder = hf_hub.download("someone/tiny", cache_dir=tmp_path, local_files_only=True)
    assert folder == snapshot and (folder / "config.json").read_text() == "{}"
    with pytest.raises(ValueError, match="owner/name"):
        hf_hub.download("tiny")


def test_load_from_hub_builds_the_cached_checkpoint(tmp_path):
    """A checkpoint in the cache's layout (hf.save of a jaxlm model as LlamaForCausalLM) loads by
    name to a model of the saved model's logits (save and load keep every tensor bit for bit)."""
    pytest.importorskip("huggingface_hub")
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxlm.interop import hf
    from jaxlm.models import LM, preset

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "models--someone--llama"
    original = LM(preset("transformer", "tiny", n_layers=2, d_ff=64), rngs=nnx.Rngs(1))
    hf.save(original, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model, folder = hf_hub.load_from_hub("someone/llama", cache_dir=tmp_path, local_files_only=True)
    assert folder == repo / "snapshots" / commit
    tokens = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6))
    np.testing.assert_array_equal(np.asarray(model(tokens).logits), np.asarray(original(tokens).logits))
    assert model.config.n_layers == 2 and model.config.layer_pattern == "A"
