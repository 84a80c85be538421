"""User mistakes given to ``python -m jaxlm.train``: each is refused before anything is built, with
a message that names the flag and the range, and the CLI prints that message without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from jaxlm import cli
from jaxlm.training import optimizer
from jaxlm.training.args import parse_args
from jaxlm.training.loop import train
from xla_flags import xla_flags

SMALL = ["--preset", "transformer", "--size", "tiny", "--steps", "4"]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "-0.003", "--lr must be a finite number > 0, got -0.003"),
        ("--lr", "0", "--lr must be a finite number > 0, got 0.0"),
        ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
        ("--clip-norm", "0", "--clip-norm must be a finite number > 0, got 0.0"),
        ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0, got -0.1"),
        ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0, got inf"),
        ("--load-balancing", "-1", "--load-balancing must be a finite number >= 0, got -1.0"),
        ("--router-z", "-1", "--router-z must be a finite number >= 0, got -1.0"),
        ("--selection-bias-rate", "-1", "--selection-bias-rate must be a finite number >= 0, got -1.0"),
        ("--grad-accum", "0", "--grad-accum must be >= 1, got 0"),
        ("--eval-every", "-5", "--eval-every must be >= 1, got -5"),
        ("--checkpoint-every", "0", "--checkpoint-every must be >= 1, got 0"),
        ("--warmup", "-1", r"--warmup must be in \[0, --steps=4\), got -1"),
        ("--warmup", "4", r"--warmup must be in \[0, --steps=4\), got 4"),
        ("--mesh", "context=2", "--mesh 'context=2': context parallelism is not implemented yet"),
    ],
)
def test_bad_numeric_arguments_are_refused_naming_the_flag(tmp_path, flag, value, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(parse_args([*SMALL, "--out", str(out), flag, value]))
    assert not out.exists()  # refused before the run folder is made


@pytest.mark.parametrize("steps, warmup", [(1, 0), (9, 0), (15, 1), (150, 15), (1000, 100)])
def test_the_default_warmup_is_a_tenth_of_the_steps(steps, warmup):
    args = parse_args(["--steps", str(steps)])
    assert args.warmup is None and args.warmup_steps() == warmup
    optimizer.learning_rate_schedule(args.lr, args.warmup_steps(), steps)  # a valid schedule
    assert parse_args(["--steps", str(steps), "--warmup", "0"]).warmup_steps() == 0


def test_the_cli_prints_the_message_without_a_traceback(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    env.pop("JAXLM_DEBUG", None)
    argv = [sys.executable, "-m", "jaxlm.train", *SMALL, "--out", str(tmp_path / "run"), "--lr", "-1"]
    got = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 1
    assert "error: --lr must be a finite number > 0, got -1.0" in got.stderr
    assert "Traceback" not in got.stderr and "JAXLM_DEBUG=1" in got.stderr
    debug = subprocess.run(argv, capture_output=True, text=True, env={**env, "JAXLM_DEBUG": "1"}, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ValueError: --lr must be" in debug.stderr


def test_the_cli_drops_only_the_closed_event_loop_reports_of_writes_in_flight(monkeypatch):
    """After a failed save, TensorStore's writes still in flight report "Event loop is closed"
    through sys.unraisablehook; the CLI's hook drops those and passes every other one on, and
    running a CLI again in the same process does not wrap it twice."""
    passed = []
    monkeypatch.setattr(sys, "unraisablehook", passed.append)
    cli._drop_closed_loop_reports()
    hook = sys.unraisablehook
    cli._drop_closed_loop_reports()
    assert sys.unraisablehook is hook
    closed = SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other_runtime = SimpleNamespace(exc_value=RuntimeError("Event loop is closed soon"))
    other_kind = SimpleNamespace(exc_value=ValueError("Event loop is closed"))
    for unraisable in (closed, other_runtime, other_kind):
        hook(unraisable)
    assert passed == [other_runtime, other_kind]
