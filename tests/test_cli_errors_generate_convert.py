"""User mistakes given to ``python -m jaxlm.generate`` and ``python -m jaxlm.convert``: a missing or
broken folder or file, a tokenizer that is not recorded, a bad flag. Each ends in one ``error:``
line that names the flag or the file, with exit status 1 and no traceback (jaxlm.cli)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from jaxlm import convert, generate
from jaxlm.interop import hf
from jaxlm.models import LM, preset

# The smallest model both CLIs handle: a one-layer Llama-shaped transformer over bytes.
TINY = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=256)


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("JAXLM_DEBUG", raising=False)  # with it set, errors keep their traceback


def exit_message(main, argv: list[str]) -> str:
    """The message main(argv) exits with. report_user_errors calls sys.exit with a string, which
    Python prints to stderr when the interpreter exits, with status 1; tyro's own argument errors
    exit with an int (status 2) instead, so a string code is exit status 1 from jaxlm."""
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    code = excinfo.value.code
    assert isinstance(code, str), f"exit status {code!r}, not 1 with a message"
    assert code.startswith("error: ") and "JAXLM_DEBUG=1" in code
    return code


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny Hugging Face checkpoint (LlamaForCausalLM: config.json and model.safetensors, no
    tokenizer.json)."""
    folder = tmp_path_factory.mktemp("hf") / "llama"
    hf.save(LM(preset("transformer", **TINY), rngs=nnx.Rngs(0)), folder)
    return folder


@pytest.fixture(scope="module")
def converted_run(hf_folder, tmp_path_factory) -> Path:
    """hf_folder converted: without a tokenizer.json, config.json records the tokenizer as null."""
    return convert.convert(hf_folder, tmp_path_factory.mktemp("runs") / "converted")


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "source"
    shutil.copytree(folder, target)
    return target


# python -m jaxlm.generate


def run_record(folder: Path, record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return folder


def model_record(**changes) -> dict:
    return {**json.loads(preset("transformer", **TINY).to_json()), **changes}


@pytest.mark.parametrize(
    "make, message",
    [
        pytest.param(lambda d: d / "missing", r"--checkpoint \S*missing does not exist; pass a run folder written by "
                     r"python -m jaxlm.train or python -m jaxlm.convert", id="missing"),
        pytest.param(lambda d: d / "file.txt", r"--checkpoint \S*file.txt is a file, not a run folder", id="a-file"),
        pytest.param(lambda d: d, r"is not a jaxlm run folder: config.json is missing", id="no-config"),
        pytest.param(lambda d: run_record(d / "r", "{not json"), r"r/config.json is not valid JSON", id="not-json"),
        pytest.param(lambda d: run_record(d / "r", {"model": "x", "tokenizer": "byte"}),
                     r"r/config.json is not a jaxlm run record", id="model-not-a-dict"),
        pytest.param(lambda d: run_record(d / "r", {"model": model_record(bogus=1), "tokenizer": "byte"}),
                     r"r/config.json records a model config jaxlm cannot build: unknown ModelConfig field\(s\) "
                     r"\['bogus'\]", id="unknown-field"),
        pytest.param(lambda d: run_record(d / "r", {"model": model_record(), "tokenizer": "byte"}),
                     r"r has no checkpoint yet", id="no-checkpoints"),
    ],
)
def test_generate_refuses_a_checkpoint_that_is_not_a_run_folder(tmp_path, make, message):
    (tmp_path / "file.txt").write_text("not a folder")
    got = exit_message(generate.main, ["--checkpoint", str(make(tmp_path)), "--max-new-tokens", "2"])
    assert re.search(message, got), got


def test_generate_given_a_hugging_face_folder_says_to_convert_it(hf_folder):
    got = exit_message(generate.main, ["--checkpoint", str(hf_folder)])
    assert f"{hf_folder / 'config.json'} is not a jaxlm run record" in got
    assert "convert it with python -m jaxlm.convert" in got


def test_generate_asks_for_a_tokenizer_when_the_checkpoint_records_none(converted_run):
    got = exit_message(generate.main, ["--checkpoint", str(converted_run), "--max-new-tokens", "2"])
    assert f"--checkpoint {converted_run} records no tokenizer" in got
    assert "pass --tokenizer, e.g. --tokenizer path/to/tokenizer.json" in got
    assert "non-empty string" not in got  # the old message, which named no flag


def test_an_explicit_tokenizer_overrides_the_checkpoints(converted_run, capsys):
    # ids:1000 is too large for the model's 256 ids: refused, which shows it was used at all.
    got = exit_message(generate.main, ["--checkpoint", str(converted_run), "--tokenizer", "ids:1000"])
    assert (f"tokenizer 'ids:1000' has 1000 ids but the model in --checkpoint {converted_run} has vocab_size 256; "
            "pass the tokenizer it was trained with") in got
    generate.main(["--checkpoint", str(converted_run), "--tokenizer", "byte", "--prompt", "ab",
                   "--max-new-tokens", "2", "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.startswith("ab") and len(out) > len("ab")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1, got 0"),
        (["--temperature", "-1"], r"error: temperature must be a finite number >= 0 \(0 is greedy\), got -1.0"),
        (["--top-p", "1.5"], r"error: top_p must be None or a number in \(0, 1\], got 1.5"),
        (["--prompt", ""], "error: --prompt is empty; pass the text to continue"),
        (["--preset", "bogus"], r"error: unknown preset 'bogus'; the presets are \["),
        (["--tokenizer", "missing.json"], r"error: tokenizer 'missing.json': no such file"),
    ],
    ids=["max-new-tokens", "temperature", "top-p", "empty-prompt", "preset", "tokenizer"],
)
def test_generate_refuses_bad_flags_without_a_traceback(flags, message, capsys):
    got = exit_message(generate.main, flags)
    assert re.match(message, got), got
    assert capsys.readouterr().out == ""  # refused before the prompt is echoed


# python -m jaxlm.convert


def test_convert_notes_that_no_tokenizer_is_recorded(hf_folder, tmp_path, capsys):
    convert.main(["--from-hf", str(hf_folder), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert captured.out == f"wrote {tmp_path / 'out'}\n"
    assert (f"note: {hf_folder} has no tokenizer.json, so none is recorded; give python -m jaxlm.generate "
            "--tokenizer") in captured.err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tokenizer"] is None


def test_convert_refuses_a_missing_or_incomplete_folder(hf_folder, tmp_path):
    out = tmp_path / "out"
    got = exit_message(convert.main, ["--from-hf", str(tmp_path / "nope"), "--out", str(out)])
    assert f"--from-hf {tmp_path / 'nope'} does not exist; pass the Hugging Face checkpoint folder" in got
    (tmp_path / "empty").mkdir()
    got = exit_message(convert.main, ["--from-hf", str(tmp_path / "empty"), "--out", str(out)])
    assert f"{tmp_path / 'empty'} is not a Hugging Face checkpoint folder: config.json is missing" in got
    source = copy_of(hf_folder, tmp_path)
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    got = exit_message(convert.main, ["--from-hf", str(source), "--out", str(out)])
    assert f"{source} holds neither model.safetensors nor model.safetensors.index.json" in got
    assert "pytorch_model.bin, PyTorch pickles" in got and "safe_serialization=True" in got
    assert not out.exists()  # nothing is written for a folder that cannot be read


def test_convert_names_a_config_json_that_is_not_json_or_lacks_a_key(hf_folder, tmp_path):
    source = copy_of(hf_folder, tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    got = exit_message(convert.main, ["--from-hf", str(source), "--out", str(tmp_path / "out")])
    assert f"{source / 'config.json'} is not valid JSON (" in got
    del config["num_attention_heads"]
    (source / "config.json").write_text(json.dumps(config))
    got = exit_message(convert.main, ["--from-hf", str(source), "--out", str(tmp_path / "out")])
    assert (f"{source / 'config.json'}: the required field 'num_attention_heads' is missing "
            "(LlamaForCausalLM needs it)") in got


@pytest.mark.parametrize("keep", [0, 20, 0.5, -4])  # bytes kept: none, part of the header, half, all but 4
def test_convert_names_a_truncated_safetensors_file(hf_folder, tmp_path, keep):
    source = copy_of(hf_folder, tmp_path)
    file = source / "model.safetensors"
    blob = file.read_bytes()
    file.write_bytes(blob[: int(len(blob) * keep) if isinstance(keep, float) else keep])
    got = exit_message(convert.main, ["--from-hf", str(source), "--out", str(tmp_path / "out")])
    assert f"{file} is not a readable safetensors file (" in got
    assert "it is truncated or corrupt; download or save it again" in got


def test_convert_names_a_sharded_index_that_is_broken(hf_folder, tmp_path):
    source = copy_of(hf_folder, tmp_path)
    index = source / "model.safetensors.index.json"
    index.write_text("[1, 2")
    got = exit_message(convert.main, ["--from-hf", str(source), "--out", str(tmp_path / "out")])
    assert f"{index} is not a valid safetensors index (" in got and '"weight_map" of tensor name' in got
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    got = exit_message(convert.main, ["--from-hf", str(source), "--out", str(tmp_path / "out")])
    assert f"{index} lists the shard model-00002-of-00002.safetensors, which is missing from {source}" in got


def test_a_wrong_shape_is_shown_as_the_file_stores_it(hf_folder, tmp_path):
    source = copy_of(hf_folder, tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))  # the tensors have 64
    got = exit_message(convert.main, ["--from-hf", str(source), "--out", str(tmp_path / "out")])
    # torch's Linear weight is [out, in] = [64, 32]; jaxlm's kernel would be [32, 64].
    assert (f"{source / 'model.safetensors'}: tensor model.layers.0.mlp.gate_proj.weight has the shape (64, 32), "
            "but config.json implies (48, 32)") in got
    assert "do not belong together" in got


def test_the_convert_cli_prints_one_line_without_a_traceback(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAXLM_DEBUG", None)
    argv = [sys.executable, "-m", "jaxlm.convert", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    got = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 1
    assert f"error: --from-hf {tmp_path / 'nope'} does not exist" in got.stderr
    assert "Traceback" not in got.stderr
