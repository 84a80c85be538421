"""The run folder (``--out``): what may serve as one, and whether a rerun continues the run it
holds. A rerun resumes only when everything that shapes the batches, the loss or the optimizer
state is what the run began with: the model, the tokenizer, the data (its spec and the
documents' fingerprint) and the fields of RESUME_FIELDS. --steps may grow; --mesh may change (a
checkpoint restores onto any mesh)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxlm.data.sources import canonical_data_spec
from jaxlm.models import ModelConfig
from jaxlm.training import checkpointing
from jaxlm.training.args import TrainArgs

RESUME_FIELDS = ("seq_len", "batch_size", "seed", "grad_accum", "lr", "warmup", "schedule", "weight_decay",
                 "clip_norm", "load_balancing", "router_z", "selection_bias_rate", "init_from")


def check_usable(run_dir: Path, lead: bool) -> None:
    """On the lead process (the one that writes the folder; the others would race its writes):
    ValueError unless ``run_dir`` is absent, an empty folder or a jaxlm run folder that this
    process can write to. The folder is created here."""
    if not lead:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file; pass a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        try:
            checkpointing.read_run_config(run_dir)
        except ValueError as err:
            raise ValueError(f"--out {run_dir} holds something other than a jaxlm run ({err}); pass a new or "
                             "empty folder") from None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".jaxlm-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {run_dir} cannot be written to ({err.strerror}); pass a folder you can "
                         "write to") from None


def data_identity(data: str, fingerprint: str) -> dict:
    """What config.json records of the data: the spec with absolute paths, and the fingerprint."""
    return {"spec": canonical_data_spec(data), "fingerprint": fingerprint}


def inherit_warmup(args: TrainArgs, run_dir: Path) -> TrainArgs:
    """With no --warmup, a resumed run keeps the warmup it began with (the default follows
    --steps, which a rerun may raise)."""
    if args.warmup is not None or not (run_dir / checkpointing.CONFIG_FILE).is_file():
        return args
    try:
        saved = (checkpointing.read_run_config(run_dir).get("train") or {}).get("warmup")
    except ValueError:  # not a run folder: check_usable says so
        return args
    return args if saved is None else dataclasses.replace(args, warmup=saved)


def check_same_run(run_dir: Path, config: ModelConfig, tokenizer_spec: str, train_args: dict, data: dict) -> None:
    """ValueError naming every field in which this run differs from the one in ``run_dir``,
    with both values; nothing when the folder holds no run yet."""
    if not (run_dir / checkpointing.CONFIG_FILE).is_file():
        return
    record = checkpointing.read_run_config(run_dir)
    saved_model, model = record["model"], json.loads(config.to_json())
    changes = [(f"--model.{name.replace('_', '-')}", saved_model.get(name), model.get(name))
               for name in sorted(set(saved_model) | set(model)) if saved_model.get(name) != model.get(name)]
    saved_data = record.get("data") or {}
    if saved_data.get("spec") != data["spec"]:
        changes.append(("--data", saved_data.get("spec"), data["spec"]))
    elif saved_data.get("fingerprint") != data["fingerprint"]:
        changes.append(("--data (the documents changed: fingerprint)", saved_data.get("fingerprint"),
                        data["fingerprint"]))
    if record["tokenizer"] != tokenizer_spec:
        changes.append(("--tokenizer", record["tokenizer"], tokenizer_spec))
    saved_train = record.get("train") or {}
    changes += [(f"--{name.replace('_', '-')}", saved_train.get(name), train_args[name])
                for name in RESUME_FIELDS if saved_train.get(name) != train_args[name]]
    if changes:
        listed = "\n".join(f"  {flag}: {old!r} in the saved run, {new!r} now" for flag, old, new in changes)
        raise ValueError(
            f"--out {run_dir} holds a run with other arguments, so it cannot be resumed with these:\n{listed}\n"
            "Rerun with the saved values to resume it, or pass another --out to start a new run."
        )
