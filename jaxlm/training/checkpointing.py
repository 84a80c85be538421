"""Checkpoints of a run: Orbax's CheckpointManager (async, keeping the last N) under
``<run>/checkpoints/<step>/``, holding the train state (parameters, other variables, optimizer
state) and a JSON record of the step and the data iterator's position. Nothing in a train step
draws random numbers, so no RNG key is saved.

A run folder also holds ``config.json`` (the model config, the tokenizer spec, the train
arguments and the data's identity) and, for a tokenizer read from a file, that file as
``tokenizer.json``; from these two ``load_trained_model`` rebuilds the model and its tokenizer
for generation without fetching anything.

A checkpoint that cannot be restored (a truncated data file, missing metadata) is passed over
for the newest one that can: training moves it aside to ``checkpoints-unreadable/<step>/``
(never deleting anything) so that the run can save that step again, and generation leaves it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxlm.models import LM, ModelConfig
from jaxlm.training.step import TrainState

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
UNREADABLE_DIR = "checkpoints-unreadable"
_RECORD_KEYS = ("model", "tokenizer")


def write_run_config(run_dir: Path, model: ModelConfig, tokenizer: str | None, train_args: dict,
                     data: dict | None = None) -> None:
    """config.json: the model config, the tokenizer spec, the train arguments and ``data`` (the
    data's identity: its canonical spec and fingerprint), written whole or not at all."""
    record = {"model": json.loads(model.to_json()), "tokenizer": tokenizer, "train": train_args, "data": data}
    path = Path(run_dir) / CONFIG_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2, default=str))
    partial.replace(path)


def read_run_config(run_dir: Path) -> dict:
    """The record of config.json; ValueError when the folder holds no jaxlm run record."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a jaxlm run folder: {CONFIG_FILE} is missing")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it is not a jaxlm run record") from None
    if not isinstance(record, dict) or any(key not in record for key in _RECORD_KEYS) \
            or not isinstance(record["model"], dict):
        raise ValueError(f"{path} is not a jaxlm run record (it has no 'model' and 'tokenizer' entries); "
                         "is this a Hugging Face folder? convert it with python -m jaxlm.convert")
    return record


def save_tokenizer(run_dir: Path, tokenizer) -> None:
    """Copies a tokenizer read from a file (a trained BPE, a tokenizer.json) into the run folder,
    so that generation needs neither the data it was trained on nor the original file."""
    source = getattr(tokenizer, "path", None)
    target = Path(run_dir) / TOKENIZER_FILE
    if source is not None and Path(source).absolute() != target.absolute():
        shutil.copyfile(source, target)


def run_tokenizer_spec(run_dir: Path, record: dict) -> str | None:
    """The run folder's own tokenizer.json when it has one, else the recorded spec."""
    own = Path(run_dir) / TOKENIZER_FILE
    return str(own.absolute()) if own.is_file() else record["tokenizer"]


def manager(run_dir: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options)


@contextlib.contextmanager
def open_manager(run_dir: Path, keep: int):
    """``manager`` as a context: its close waits for the saves in flight, and a save that fails
    there is a CheckpointWriteError."""
    mgr = manager(run_dir, keep)
    try:
        yield mgr
    finally:
        with reporting_write_errors(mgr, mgr.latest_step() or 0):
            mgr.close()


def finish_saves(mgr: ocp.CheckpointManager) -> None:
    """Waits for the saves in flight; CheckpointWriteError when one fails."""
    with reporting_write_errors(mgr, mgr.latest_step() or 0):
        mgr.wait_until_finished()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the message names the step,
    the folder and the cause, and says which earlier checkpoints are intact."""


@contextlib.contextmanager
def reporting_write_errors(mgr: ocp.CheckpointManager, step: int):
    """Turns an error from saving (or finishing) checkpoints into one CheckpointWriteError. An
    async save's error surfaces at a later call, so the failed step is read from the path in the
    message when it is there; ``step`` is the one being saved now."""
    try:
        yield
    except Exception as err:  # noqa: BLE001  (TensorStore reports I/O errors as ValueError)
        text = str(err)
        found = re.search(r"checkpoints/(\d+)\.orbax-checkpoint-tmp", text)
        failed = int(found.group(1)) if found else step
        cause = next((m.group(0) for m in [re.search(r"No space left on device|Disk quota exceeded|"
                                                     r"Read-only file system|Permission denied|File too large", text)] if m),
                     _first_line(err))
        intact = [s for s in mgr.all_steps() if s != failed]
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {failed} to {mgr.directory}: {cause}. The checkpoints of "
            f"steps {sorted(intact)} are intact; make room (or fix the folder) and rerun to resume from the newest"
        ) from err


def save(mgr: ocp.CheckpointManager, step: int, state: TrainState, data_state: dict, force: bool = False) -> None:
    """Starts an async save of the state at ``step`` (the number of steps taken) and of
    ``data_state``, the data iterator's position after that step's batch. CheckpointWriteError
    when this save, or the one before it, fails."""
    meta = {"step": step, "data": data_state}
    with reporting_write_errors(mgr, step):
        mgr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )


def _first_restorable(steps: list[int], restore: Callable[[int], object], run_dir: Path,
                      on_unreadable: Callable[[int, Exception], None]):
    """(step, restore(step)) for the newest of ``steps`` that restores; on_unreadable(step, error)
    for each newer one that does not. (None, None) when ``steps`` is empty; ValueError when none
    of them restores."""
    errors = []
    for step in sorted(steps, reverse=True):
        try:
            return step, restore(step)
        except Exception as err:  # noqa: BLE001  (TensorStore and Orbax raise many kinds)
            errors.append(f"step {step}: {_first_line(err)}")
            on_unreadable(step, err)
    if errors:
        raise ValueError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} can be restored: " + "; ".join(errors))
    return None, None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
    """(state, {"step", "data"}) of the newest checkpoint that restores, the state placed like
    ``abstract_state`` (a pytree of jax.ShapeDtypeStruct with shardings); None when there is
    none. Each newer checkpoint that cannot be restored is moved to checkpoints-unreadable/, and
    the move is reported on stderr."""
    checkpoints = Path(mgr.directory)
    run_dir = checkpoints.parent

    def restore(step: int):
        return mgr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )

    def move_aside(step: int, err: Exception) -> None:
        target = run_dir / UNREADABLE_DIR / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(checkpoints / str(step)), _free_path(target))
        print(f"checkpoint {step} cannot be restored ({_first_line(err)}); moved it to {target} and trying the "
              "one before", file=sys.stderr)

    step, restored = _first_restorable(mgr.all_steps(), restore, run_dir, move_aside)
    mgr.reload()  # it still lists the checkpoints moved aside
    if step is None:
        return None
    meta = restored["meta"]
    return TrainState(*restored["state"]), {"step": meta["step"], "data": meta["data"]}


def _free_path(path: Path) -> str:
    """``path``, or ``path.1``, ``path.2``… when it is taken (a step moved aside twice)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return str(candidate)


def save_pretrained_model(model: LM, tokenizer_spec: str, out_dir: str | Path) -> Path:
    """Writes ``model`` as a run folder without optimizer state: ``config.json`` and
    ``checkpoints/0/`` with the parameters and other variables. ``python -m jaxlm.generate
    --checkpoint`` loads it, and ``python -m jaxlm.train --init-from`` starts from it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(out_dir, model.config, tokenizer_spec, {})
    _, params, others = nnx.split(model, nnx.Param, ...)
    mgr = manager(out_dir, keep=1)
    mgr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "others": others})), force=True)
    mgr.wait_until_finished()
    mgr.close()
    return out_dir


def abstract_like(state: TrainState, shardings: TrainState) -> TrainState:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def load_trained_model(run_dir: str | Path, step: int | None = None) -> tuple[LM, str | None]:
    """(the model with its parameters from the newest checkpoint that restores, or from
    ``step``; the tokenizer spec: the folder's tokenizer.json, else the recorded spec) of a run
    folder written by ``python -m jaxlm.train`` or ``python -m jaxlm.convert``. A newer
    checkpoint that cannot be restored is reported on stderr and left in place."""
    run_dir = Path(run_dir)
    record = read_run_config(run_dir)
    config = ModelConfig().replace(**record["model"])
    model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    mgr = ocp.CheckpointManager(run_dir.absolute() / "checkpoints")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), (params, others))
    # Restore only the parameters and variables; the optimizer state stays on disk.
    item = {"params": abstract[0], "others": abstract[1]}

    def restore(at: int):
        return mgr.restore(at, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))

    def report(at: int, err: Exception) -> None:
        print(f"checkpoint {at} in {run_dir} cannot be restored ({_first_line(err)}); trying the one before",
              file=sys.stderr)

    steps = mgr.all_steps()
    if step is not None and step not in steps:
        raise ValueError(f"{run_dir} has no checkpoint of step {step}; it has {sorted(steps)}")
    found, restored = _first_restorable([step] if step is not None else steps, restore, run_dir, report)
    mgr.close()
    if found is None:
        raise ValueError(f"{run_dir} has no checkpoint yet: its checkpoints/ folder is empty; wait for the run's "
                         "first checkpoint (--checkpoint-every) or pass another run folder")
    state = jax.device_put(restored["state"], device)
    return nnx.merge(graphdef, state["params"], state["others"]), run_tokenizer_spec(run_dir, record)
