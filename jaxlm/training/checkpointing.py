"""Checkpoints of a run: Orbax's CheckpointManager (async, keeping the last N) under
``<run>/checkpoints/<step>/``, holding the train state (parameters, other variables, optimizer
state) and a JSON record of the step and the data iterator's position. Nothing in a train step
draws random numbers, so no RNG key is saved.

A run folder also holds ``config.json`` (the model config, the tokenizer spec and the train
arguments), from which ``load_trained_model`` rebuilds the model for generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxlm.models import LM, ModelConfig
from jaxlm.training.step import TrainState

CONFIG_FILE = "config.json"


def write_run_config(run_dir: Path, model: ModelConfig, tokenizer: str, train_args: dict) -> None:
    record = {"model": json.loads(model.to_json()), "tokenizer": tokenizer, "train": train_args}
    (run_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str))


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a jaxlm run folder: {CONFIG_FILE} is missing")
    return json.loads(path.read_text())


def manager(run_dir: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: TrainState, data_state: dict, force: bool = False) -> None:
    """Starts an async save of the state at ``step`` (the number of steps taken) and of
    ``data_state``, the data iterator's position after that step's batch."""
    meta = {"step": step, "data": data_state}
    mgr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
    """(state, {"step", "data"}) of the latest checkpoint, the state placed like ``abstract_state``
    (a pytree of jax.ShapeDtypeStruct with shardings); None when there is none."""
    step = mgr.latest_step()
    if step is None:
        return None
    restored = mgr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    meta = restored["meta"]
    return TrainState(*restored["state"]), {"step": meta["step"], "data": meta["data"]}


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


def load_trained_model(run_dir: str | Path, step: int | None = None) -> tuple[LM, str]:
    """(the model with its parameters from the latest checkpoint, or ``step``; the tokenizer
    spec) of a run folder written by ``python -m jaxlm.train``."""
    run_dir = Path(run_dir)
    record = read_run_config(run_dir)
    config = ModelConfig().replace(**record["model"])
    model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    mgr = ocp.CheckpointManager(run_dir.absolute() / "checkpoints")
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{run_dir} has no checkpoint yet")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), (params, others))
    # Restore only the parameters and variables; the optimizer state stays on disk.
    item = {"params": abstract[0], "others": abstract[1]}
    restored = mgr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
            )
        ),
    )
    state = jax.device_put(restored["state"], device)
    return nnx.merge(graphdef, state["params"], state["others"]), record["tokenizer"]

