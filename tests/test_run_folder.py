"""The run folder (--out) of ``python -m jaxlm.train``: what may serve as one, a rerun that changes
the run is refused, a resume logs each step once, a corrupt newest checkpoint gives way to the one
before it, the tokenizer travels with the run, and YAML mistakes name the file. Nothing a refused
run touches is changed or deleted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlm import data
from jaxlm.training import checkpointing
from jaxlm.training.args import parse_args
from jaxlm.training.loop import train
from jaxlm.training.metrics import read_metrics
from xla_flags import xla_flags

RUN = ["--preset", "transformer", "--size", "tiny", "--seq-len", "16", "--batch-size", "8", "--steps", "4",
       "--checkpoint-every", "2", "--eval-every", "4", "--eval-batches", "1", "--keep-checkpoints", "10",
       "--sample-tokens", "2", "--tokenizer", "bpe:280"]


def write_corpus(folder: Path, docs: int = 120) -> Path:
    folder.mkdir(parents=True)
    for i in range(docs):
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}: " + " ".join(f"word{(i * j) % 97}" for j in range(60)))
    return folder


def train_in(out: Path, corpus: Path, *extra: str) -> None:
    train(parse_args([*RUN, "--data", str(corpus), "--out", str(out), *extra]))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime in ns) of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if r["split"] == "train"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, dict[int, float]]:
    """(the run folder, its corpus, step -> train loss) of a 4-step run checkpointed at 2 and 4.
    Its folder first saw a config that fails to build, which must leave it usable."""
    root = tmp_path_factory.mktemp("run")
    corpus = write_corpus(root / "corpus")
    out = root / "out"
    with pytest.raises(ValueError, match="n_heads"):
        train_in(out, corpus, "--model.n-heads", "3")  # 64 wide: no head_dim divides it
    assert not (out / checkpointing.CONFIG_FILE).exists() and not any(out.iterdir())
    train_in(out, corpus)
    return out, corpus, {r["step"]: r["loss"] for r in read_metrics(out) if r["split"] == "train"}


def test_a_run_writes_its_record_and_its_tokenizer(run):
    out, corpus, losses = run
    assert sorted(losses) == [1, 2, 3, 4] and train_steps(out) == [1, 2, 3, 4]
    record = json.loads((out / "config.json").read_text())
    assert record["data"]["spec"] == str(corpus.absolute()) and record["train"]["warmup"] == 0
    # The trained BPE is in the run folder, and loading the run reads it from there.
    model, spec = checkpointing.load_trained_model(out)
    assert spec == str((out / "tokenizer.json").absolute())
    assert data.load_tokenizer(spec).encode("word42 word7").tolist() == \
        data.load_tokenizer(record["tokenizer"]).encode("word42 word7").tolist()
    assert model.config.vocab_size >= 280


def test_a_rerun_that_changes_the_run_is_refused_naming_each_change(run, tmp_path):
    out, corpus, _ = run
    before = snapshot(out)
    other = write_corpus(tmp_path / "other", docs=130)
    with pytest.raises(ValueError) as refused:
        train_in(out, other, "--seq-len", "8", "--lr", "0.001")
    message = str(refused.value)
    assert f"--out {out} holds a run with other arguments" in message
    assert f"--data: {str(corpus.absolute())!r} in the saved run, {str(other.absolute())!r} now" in message
    assert "--seq-len: 16 in the saved run, 8 now" in message and "--lr: 0.003 in the saved run, 0.001 now" in message
    assert "pass another --out" in message
    assert snapshot(out) == before


def test_changed_documents_are_refused(run, tmp_path):
    out, corpus, _ = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (corpus / "doc000.txt").write_text((corpus / "doc000.txt").read_text() + " one more word")
    try:
        with pytest.raises(ValueError, match=r"--data \(the documents changed: fingerprint\)"):
            train_in(copy, corpus)
    finally:
        (corpus / "doc000.txt").write_text((corpus / "doc000.txt").read_text()[: -len(" one more word")])


def test_more_steps_resume_and_log_each_step_once(run, tmp_path, capsys):
    out, corpus, losses = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    train_in(copy, corpus, "--steps", "6")
    assert f"resumed {copy} at step 4" in capsys.readouterr().out
    assert train_steps(copy) == [1, 2, 3, 4, 5, 6]
    assert json.loads((copy / "config.json").read_text())["train"]["warmup"] == 0  # kept, not 6 // 10 again


def test_a_corrupt_newest_checkpoint_gives_way_to_the_one_before(run, tmp_path, capsys):
    out, corpus, losses = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for chunk in (copy / "checkpoints" / "4" / "state").glob("ocdbt.process_0/d/*"):
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # every array's data truncated
    corrupt = snapshot(copy / "checkpoints" / "4")

    # Generation passes over it and leaves it where it is.
    model, _ = checkpointing.load_trained_model(copy)
    assert "checkpoint 4 in" in capsys.readouterr().err and snapshot(copy / "checkpoints" / "4") == corrupt

    # Training moves it aside (intact), resumes at step 2 and replays steps 3 and 4 exactly.
    train_in(copy, corpus)
    err = capsys.readouterr()
    assert f"checkpoint 4 cannot be restored" in err.err and f"resumed {copy} at step 2" in err.out
    assert snapshot(copy / "checkpoints-unreadable" / "4") == corrupt
    assert sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert train_steps(copy) == [1, 2, 3, 4]
    replayed = {r["step"]: r["loss"] for r in read_metrics(copy) if r["split"] == "train"}
    assert replayed == pytest.approx(losses, rel=1e-6, abs=1e-6)


def test_no_checkpoint_that_restores_is_an_error_naming_each(run, tmp_path):
    out, _, _ = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for step in ("2", "4"):
        for p in (copy / "checkpoints" / step).rglob("*"):
            if p.is_file() and p.stat().st_size > 64:
                p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be restored: step 4: .*; step 2: "):
        checkpointing.load_trained_model(copy)


def test_a_failed_checkpoint_write_is_one_message_and_the_earlier_ones_stay(run, tmp_path):
    """A process that may write no file past 256 KiB stands in for a full disk (both fail inside
    TensorStore's writes): the CLI prints one message naming the step and the folder, and the
    checkpoints already there are untouched."""
    out, corpus, _ = run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = snapshot(copy / "checkpoints")

    # The limit is set in the child itself: a preexec_fn would fork this multithreaded process.
    limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10)); sys.argv[0] = 'jaxlm.train'; "
               "runpy.run_module('jaxlm.train', run_name='__main__')")  # SIG_IGN: a write past it fails with EFBIG
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAXLM_DEBUG"))}
    env.update(XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-c", limited, *RUN, "--data", str(corpus), "--out", str(copy), "--steps", "6"]
    got = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 1, got.stderr
    assert f"error: could not write the checkpoint of step 6 to {copy / 'checkpoints'}: File too large. " \
           "The checkpoints of steps [2, 4] are intact" in got.stderr
    # One message: no traceback, from this process or from the writes still in flight when the
    # save failed (jaxlm.cli drops their "Event loop is closed" reports).
    assert "Traceback" not in got.stderr and "Event loop is closed" not in got.stderr, got.stderr
    assert got.stderr.count("File too large") == 1 and got.stderr.count("error:") == 1, got.stderr
    assert {k: v for k, v in snapshot(copy / "checkpoints").items() if k.startswith(("2/", "4/"))} == before


@pytest.mark.parametrize("kind", ["file", "hugging_face", "other_metrics", "unwritable"])
def test_unusable_out_folders_are_refused_before_anything_is_built(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a folder")
        expected = f"--out {out} is a file; pass a folder"
    elif kind == "hugging_face":
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
        expected = "is not a jaxlm run record .*python -m jaxlm.convert"
    elif kind == "other_metrics":
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n')
        expected = "holds something other than a jaxlm run .*config.json is missing.*pass a new or empty folder"
    else:
        out = Path("/proc/jaxlm-test-run")  # nobody, root included, can make a folder here
        expected = f"--out {out} cannot be written to"
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=expected):
        train(parse_args([*RUN, "--tokenizer", "byte", "--out", str(out)]))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: [1\n", r"(?s)--config '.*bad.yaml' is not valid YAML: .*bad.yaml\", line 1, column 8"),
        ('steps: "ten"\n', r"--config '.*bad.yaml': steps must be int, got 'ten'"),
        ("lr: true\n", r"--config '.*bad.yaml': lr must be float, got True"),
        ("schedule: linear\n", r"--config '.*bad.yaml': schedule must be one of 'cosine', 'wsd', got 'linear'"),
        ("model:\n  n_layers: 2.5\n", r"--config '.*bad.yaml': model.n_layers must be int or null, got 2.5"),
        ("model: 3\n", r"--config '.*bad.yaml': model must be a mapping"),
        ("- steps\n", r"--config '.*bad.yaml' must hold a mapping"),
    ],
)
def test_yaml_mistakes_name_the_file_and_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_args(["--config", str(path)])


def test_a_good_yaml_file_still_parses(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("steps: 7\nlr: 1\nmodel:\n  n-layers: 2\n  dtype: bfloat16\n")
    args = parse_args(["--config", str(path), "--lr", "0.5"])
    assert (args.steps, args.lr, args.model.n_layers, args.model.dtype) == (7, 0.5, 2, "bfloat16")
