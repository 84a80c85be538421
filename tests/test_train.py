"""The training job end to end: the CLI, resumption after kill -9 and SIGTERM, non-finite losses,
sharded and multi-process runs against a single device.

In this process JAX sees 8 fake CPU devices (conftest.py); runs that need another device count
go through a subprocess with its own device count (xla_flags.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlm.training.args import parse_args
from jaxlm.training.checkpointing import load_trained_model
from jaxlm.train import main as train_cli
from jaxlm.training.loop import NonFiniteLoss, train
from jaxlm.training.metrics import read_metrics
from xla_flags import xla_flags

TINY = ["--size", "tiny", "--seq-len", "32", "--batch-size", "8", "--warmup", "1", "--sample-tokens", "4",
        "--eval-batches", "1"]


def run_in_process(out: Path, *extra: str) -> list[dict]:
    train(parse_args([*TINY, "--out", str(out), *extra]))
    return read_metrics(out)


def cli(out: Path, *extra: str, devices: int = 8, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "XLA_FLAGS": xla_flags(devices),
                "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "jaxlm.train", *TINY, "--out", str(out), *extra],
        env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def train_losses(records: list[dict]) -> dict[int, float]:
    """step -> loss of the train records, where each step appears once (a resume drops what a
    killed run logged past its checkpoint)."""
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """An uninterrupted 24-step tiny Gated DeltaNet run, checkpointing every 4 steps."""
    out = tmp_path_factory.mktemp("reference")
    records = run_in_process(out, "--preset", "gated_deltanet", "--steps", "24", "--checkpoint-every", "4",
                             "--eval-every", "12", "--keep-checkpoints", "10")
    return out, train_losses(records)


def test_cli_run_learns_and_writes_its_outputs(reference_run):
    out, losses = reference_run
    assert sorted(losses) == list(range(1, 25))
    assert np.mean([losses[s] for s in (22, 23, 24)]) < losses[1] - 0.5, losses
    for name in ("config.json", "metrics.jsonl", "loss.png", "sample.txt"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12, 16, 20, 24]
    records = read_metrics(out)
    assert {r["step"] for r in records if r["split"] == "validation"} == {12, 24}
    train_record = next(r for r in records if r["split"] == "train")
    assert {"loss", "perplexity", "grad_norm", "lr", "tokens_per_second", "mfu"} <= set(train_record)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["layer_pattern"] == "G" and config["tokenizer"] == "byte"


def test_kill_then_rerun_gives_the_uninterrupted_losses(reference_run, tmp_path):
    """Also with metrics read back every 3 steps instead of 10: the cadence of the read-backs
    (and the batches prepared ahead of them) changes nothing in the training."""
    _, expected = reference_run
    proc = cli(tmp_path, "--preset", "gated_deltanet", "--steps", "24", "--checkpoint-every", "4",
               "--eval-every", "12", "--keep-checkpoints", "10", "--log-every", "3")
    wait_for(lambda: (tmp_path / "checkpoints" / "8").is_dir() and not proc.poll(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_metrics(tmp_path))
    assert killed_at < 24, "the run finished before the kill; the test did not interrupt it"
    records = run_in_process(tmp_path, "--preset", "gated_deltanet", "--steps", "24", "--checkpoint-every", "4",
                             "--eval-every", "12", "--keep-checkpoints", "10")
    resumed = train_losses(records)
    assert sorted(resumed) == list(range(1, 25))
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step


def test_sigterm_saves_the_step_it_was_on(tmp_path):
    proc = cli(tmp_path, "--preset", "gated_deltanet", "--steps", "500", "--checkpoint-every", "1000", devices=1)
    wait_for(lambda: len(read_metrics(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output  # the shell's convention: a scheduler sees the preemption
    last = max(r["step"] for r in read_metrics(tmp_path))
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [last], (saved, last)
    assert f"SIGTERM: saved step {last}" in output
    model, tokenizer = load_trained_model(tmp_path)
    assert tokenizer == "byte" and model.config.layer_pattern == "G"


DIVERGING = ["--preset", "transformer", "--steps", "20", "--lr", "1e30", "--clip-norm", "1e30", "--warmup", "0"]


def saved_steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """Checkpointing every step reads every step back: the run stops at the first non-finite
    loss with the checkpoint of the step before it. Reading back only every 20 steps finds the
    same step (the first non-finite one in the window) and writes no checkpoint at all; through
    the CLI the error is the exit message."""
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss .* at step (\d+).*The last good checkpoint is step"):
        run_in_process(tmp_path / "every", *DIVERGING, "--checkpoint-every", "1")
    records = read_metrics(tmp_path / "every")
    bad = max(r["step"] for r in records) + 1
    assert sorted(r["step"] for r in records) == list(range(1, bad))
    assert all(np.isfinite(r["loss"]) for r in records)
    assert max(saved_steps(tmp_path / "every")) == bad - 1

    with pytest.raises(SystemExit, match=rf"non-finite loss .* at step {bad};.*No checkpoint was written"):
        train_cli([*TINY, "--out", str(tmp_path / "window"), *DIVERGING, "--checkpoint-every", "20",
                   "--eval-every", "20", "--log-every", "20"])
    records = read_metrics(tmp_path / "window")
    assert sorted(r["step"] for r in records) == list(range(1, bad))  # the finite steps before it are logged
    assert saved_steps(tmp_path / "window") == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


MESH_RUN = ["--preset", "qwen3_next", "--steps", "5", "--checkpoint-every", "5", "--eval-every", "5"]


@pytest.fixture(scope="module")
def eight_device_losses(tmp_path_factory) -> dict[int, float]:
    """The 8-device run, in its own process like the runs it is compared with."""
    out = tmp_path_factory.mktemp("mesh8")
    proc = cli(out, *MESH_RUN, "--mesh", "data=2,expert=4", devices=8)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    return train_losses(read_metrics(out))


def test_sharded_run_equals_one_device(eight_device_losses, tmp_path):
    proc = cli(tmp_path, *MESH_RUN, devices=1)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    single = train_losses(read_metrics(tmp_path))
    for step, loss in single.items():
        assert eight_device_losses[step] == pytest.approx(loss, rel=1e-5), step


def test_two_processes_equal_one_process(eight_device_losses, tmp_path):
    port = _free_port()
    procs = [
        cli(tmp_path, *MESH_RUN, "--mesh", "data=2,expert=4", devices=4,
            env={"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    joint = train_losses(read_metrics(tmp_path))
    assert sorted(joint) == sorted(eight_device_losses)
    for step, loss in joint.items():
        assert eight_device_losses[step] == pytest.approx(loss, rel=1e-5), step


def test_too_small_corpus_and_bad_arguments(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("too short")
    with pytest.raises(ValueError, match="small.txt"):
        run_in_process(tmp_path / "run", "--preset", "transformer", "--steps", "2", "--data", str(corpus))
    with pytest.raises(ValueError, match="--warmup"):
        run_in_process(tmp_path / "run", "--preset", "transformer", "--steps", "2", "--warmup", "5")
    with pytest.raises(ValueError, match="--log-every must be >= 1, got 0"):
        run_in_process(tmp_path / "run", "--preset", "transformer", "--steps", "2", "--log-every", "0")
    with pytest.raises(ValueError, match="data × fsdp = 8"):
        run_in_process(tmp_path / "run", "--preset", "transformer", "--steps", "2", "--batch-size", "4")
    with pytest.raises(SystemExit):
        parse_args(["--preset", "gpt"])
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag", "1"])


def test_yaml_config_with_model_overrides_and_flags_on_top(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: gla\nsteps: 7\nlr: 0.01\nmodel:\n  d_model: 64\n  n_layers: 2\n")
    args = parse_args(["--config", str(path), "--steps", "9"])
    assert (args.preset, args.steps, args.lr) == ("gla", 9, 0.01)
    assert args.model_overrides() == {"d_model": 64, "n_layers": 2}
    path.write_text("preset: gla\nstepz: 7\n")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['stepz'\]"):
        parse_args(["--config", str(path)])


def test_generate_cli_and_fine_tuning_from_a_saved_model(reference_run, tmp_path, capsys):
    from jaxlm.generate import main as generate_main
    from jaxlm.training.checkpointing import save_pretrained_model

    out, losses = reference_run
    generate_main(["--checkpoint", str(out), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"])
    printed = capsys.readouterr().out
    assert printed.startswith("def ") and len(printed) > len("def ")
    model, tokenizer = load_trained_model(out)
    saved = save_pretrained_model(model, tokenizer, tmp_path / "pretrained")
    records = run_in_process(tmp_path / "tuned", "--init-from", str(saved), "--steps", "2", "--preset", "transformer")
    tuned = train_losses(records)
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["model"]["layer_pattern"] == "G"  # the saved model's config, not the preset's
    assert tuned[1] < losses[1] - 0.5  # it starts from the trained parameters
