"""The training job's arguments: one dataclass that tyro turns into the CLI, optionally seeded
from a YAML file (``--config FILE.yaml``), plus ``--model.FIELD`` overrides of any ModelConfig
field (the fields are generated from ModelConfig, so a new field is a new flag)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import tyro
import yaml

from jaxlm.models import FAMILIES, SIZES, ModelConfig
from jaxlm.training.optimizer import SCHEDULES

# The CLI's choices, read from the tables that define them.
PresetName = Literal[tuple(FAMILIES)]
SizeName = Literal[tuple(SIZES)]
ScheduleName = Literal[SCHEDULES]

_MODEL_TYPES = typing.get_type_hints(ModelConfig)
ModelOverrides = dataclasses.make_dataclass(
    "ModelOverrides",
    [(f.name, Optional[_MODEL_TYPES[f.name]], field(default=None)) for f in dataclasses.fields(ModelConfig)],
    frozen=True,
)
ModelOverrides.__doc__ = "Override any field of the preset's ModelConfig (unset: the preset's value)."


@dataclass(frozen=True)
class TrainArgs:
    """Train a jaxlm model. With no arguments: a small Qwen3-Next-style hybrid on the embedded
    corpus (the running Python's standard library and docs), on CPU, in a few minutes."""

    preset: PresetName = "qwen3_next"
    """Model family (jaxlm.models.preset)."""
    size: SizeName = "small"
    steps: int = 60
    """Optimizer steps in all (a resumed run continues to this count)."""
    batch_size: int = 8
    """Global batch, in rows of seq_len tokens."""
    seq_len: int = 256
    lr: float = 3e-3
    warmup: Optional[int] = None
    """Linear warmup steps; default a tenth of --steps."""
    schedule: ScheduleName = "cosine"
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum: int = 1
    """Micro-steps per optimizer step; batch_size is split among them."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype; parameters and optimizer state stay float32."""
    remat: bool = False
    """Recompute each layer's activations in the backward pass (less memory, more compute)."""
    out: Optional[str] = None
    """Run folder; default runs/<preset>-<size>. A rerun with the same folder resumes."""
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    eval_every: int = 50
    log_every: int = 10
    """Read the train metrics back from the device every this many steps, and log each of them
    (also at every evaluation and checkpoint); 1 makes the host wait for every step."""
    eval_batches: int = 4
    seed: int = 0
    data: str = "default"
    """default | a text file, folder or glob | a .bin token file | hf:owner/name | mqar."""
    tokenizer: Optional[str] = None
    """byte | bpe:N | path/to/tokenizer.json; default byte (ids for mqar)."""
    mesh: Optional[str] = None
    """Device mesh, e.g. data=2,expert=4 (axes data, fsdp, expert, tensor; context is reserved for context
    parallelism, not yet built); default all data."""
    load_balancing: float = 0.01
    """MoE load-balancing loss coefficient."""
    router_z: float = 0.001
    """MoE router z-loss coefficient."""
    selection_bias_rate: float = 1e-3
    """Step of the auxiliary-loss-free bias update (configs with use_selection_bias)."""
    init_from: Optional[str] = None
    """Start from the parameters of this run or converted checkpoint folder (fine-tuning)."""
    sample_prompt: str = "def "
    sample_tokens: int = 200
    config: Optional[str] = None
    """A YAML file of these arguments (and a `model:` mapping of overrides); flags win over it."""
    model: ModelOverrides = field(default_factory=ModelOverrides)

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.preset}-{self.size}"

    def warmup_steps(self) -> int:
        return self.steps // 10 if self.warmup is None else self.warmup

    def model_overrides(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self.model).items() if v is not None}


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _matches(value: object, hint: object) -> bool:
    """Whether a YAML value fits a field's annotation (an int is a valid float, a bool is not an int)."""
    origin, options = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in options)
    if origin is Literal:
        return value in options
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # a nested dataclass (model) is checked field by field


def _describe(hint: object) -> str:
    origin, options = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in options)
    if origin is Literal:
        return "one of " + ", ".join(repr(option) for option in options)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check_types(values: dict, hints: dict, path: str, prefix: str = "") -> None:
    for name, value in values.items():
        if not _matches(value, hints[name]):
            raise ValueError(f"--config {path!r}: {prefix}{name} must be {_describe(hints[name])}, got {value!r}")


def defaults_from_yaml(path: str) -> TrainArgs:
    """TrainArgs from a YAML mapping of its fields (``model:`` a mapping of ModelConfig fields).
    ValueError naming the file for a missing file, bad YAML, an unknown name or a wrong type."""
    if not Path(path).is_file():
        raise ValueError(f"--config {path!r}: no such file")
    try:
        with open(path) as stream:  # a stream, so that YAML's messages name the file
            values = yaml.safe_load(stream) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path!r} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of argument names to values")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path!r}: unknown argument(s) {unknown}; the arguments are {sorted(known)}")
    model = values.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ValueError(f"--config {path!r}: model must be a mapping of model fields to values, got {model!r}")
    model = {str(k).replace("-", "_"): v for k, v in model.items()}
    model_fields = {f.name for f in dataclasses.fields(ModelOverrides)}
    bad = sorted(set(model) - model_fields)
    if bad:
        raise ValueError(f"--config {path!r}: unknown model field(s) {bad}; the fields are {sorted(model_fields)}")
    _check_types(values, typing.get_type_hints(TrainArgs), path)
    _check_types(model, typing.get_type_hints(ModelOverrides), path, prefix="model.")
    return TrainArgs(**values, model=ModelOverrides(**model), config=path)


def parse_args(argv: Sequence[str] | None = None) -> TrainArgs:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path(argv)
    default = defaults_from_yaml(path) if path else TrainArgs()
    return tyro.cli(TrainArgs, args=argv, default=default, prog="python -m jaxlm.train")
