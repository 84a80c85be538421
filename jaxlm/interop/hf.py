"""Hugging Face checkpoints in and out: ``load(path) -> LM`` and ``save(model, path)``.

A checkpoint folder holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), as transformers' ``save_pretrained`` writes it. The config's
``architectures[0]`` picks the mapping (``SUPPORTED``); an architecture or option jaxlm cannot
express exactly raises ValueError naming it and listing what is supported.

Parameter placement (``mesh``): each parameter is placed as the trainer places it, by the
logical axes it was created with under ``jaxlm.sharding.RULES`` (the MoE experts' leading axis
over the mesh axis ``expert``, what the expert-parallel path expects; widths over ``fsdp`` and
``tensor``); a mesh axis the mesh lacks, or whose size does not divide the parameter's axis,
leaves that axis replicated. Without a mesh, parameters land on the default device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from jaxlm.interop import hf_kimi_linear, hf_mamba, hf_minimax, hf_nemotron_h, hf_qwen3_next, hf_transformer
from jaxlm.interop.hf_config import Architecture
from jaxlm.interop.hf_tensors import SINGLE_FILE, CheckpointReader, fill_model, model_tensors, write_safetensors
from jaxlm.models import LM, ModelConfig

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in hf_transformer.ARCHITECTURES + hf_mamba.ARCHITECTURES + hf_qwen3_next.ARCHITECTURES
    + hf_nemotron_h.ARCHITECTURES + hf_minimax.ARCHITECTURES + hf_kimi_linear.ARCHITECTURES
}
SUPPORTED = tuple(ARCHITECTURES)
DTYPES = ("float32", "bfloat16")
CONFIG_FILE = "config.json"


def read_config(path: str | Path) -> dict:
    """The checkpoint's config.json as a dict; ValueError naming the folder or the file when the
    folder is missing, or the file is missing or is not a JSON object."""
    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"{path} does not exist; pass a Hugging Face checkpoint folder ({CONFIG_FILE} and "
                         f"{SINGLE_FILE})")
    if not folder.is_dir():
        raise ValueError(f"{path} is a file; pass the Hugging Face checkpoint folder that holds {CONFIG_FILE} "
                         f"and {SINGLE_FILE}")
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{path} is not a Hugging Face checkpoint folder: {CONFIG_FILE} is missing")
    try:
        hf = json.loads(file.read_text())
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for a file that is not text
        raise ValueError(f"{file} is not valid JSON ({err}); download it again or repair it") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{file} holds a JSON {type(hf).__name__}, not the object of config fields transformers "
                         "writes")
    return hf


def architecture_of(hf: dict) -> Architecture:
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {names}; supported: {', '.join(SUPPORTED)}")
    return ARCHITECTURES[names[0]]


def to_model_config(hf: dict, dtype: str = "float32") -> ModelConfig:
    """The jaxlm ModelConfig of an HF config dict, computing and storing in ``dtype``; ValueError
    naming the field when a required one is missing or has a value of the wrong type."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    arch = architecture_of(hf)
    # The mappings read required fields as hf[key]: a KeyError here is a field the config lacks,
    # and a TypeError a field of the wrong type (a string where a number belongs).
    try:
        config = arch.to_config(hf)
    except KeyError as err:
        raise ValueError(f"the required field {err.args[0]!r} is missing ({arch.name} needs it); is the file "
                         "complete?") from None
    except TypeError as err:
        raise ValueError(f"a field has a value of the wrong type for {arch.name} ({err})") from None
    return config.replace(dtype=dtype, param_dtype=dtype)


class RenamedReader:
    """A CheckpointReader whose tensors go by the names an architecture's rules use: each stored
    name through the ``renames`` (regex, replacement) pairs in turn; the same reads otherwise."""

    def __init__(self, reader: CheckpointReader, renames: tuple[tuple[str, str], ...]):
        self.reader, self.folder = reader, reader.folder
        self.stored: dict[str, str] = {}
        for name in sorted(reader.names()):
            canonical = name
            for pattern, replacement in renames:
                canonical = re.sub(pattern, replacement, canonical)
            if canonical in self.stored:
                raise ValueError(f"{reader.folder}: the tensors {self.stored[canonical]} and {name} are two spellings "
                                 f"of {canonical}; keep one")
            self.stored[canonical] = name

    def names(self) -> set[str]:
        return set(self.stored)

    def file_of(self, name: str) -> Path:
        return self.reader.file_of(self.stored.get(name, name))

    def get(self, name: str):
        return self.reader.get(self.stored.get(name, name))


def load(path: str | Path, dtype: str = "float32", mesh: Mesh | None = None) -> LM:
    """The LM of a Hugging Face checkpoint folder, parameters in ``dtype`` ("float32" or
    "bfloat16", for compute and storage alike), placed on ``mesh`` as the module docstring says.

    The model is built abstractly and filled tensor by tensor: the checkpoint is never in memory
    twice. Every checkpoint tensor must be used (apart from ones transformers ignores or
    recomputes too: multi-token-prediction heads, MiniMax's decay buffers), so a mapping gap is
    an error, not a silent skip. Tensor names pass through the architecture's ``renames`` first,
    so other spellings of the same checkpoint (Moonshot's Kimi Linear) load too.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    hf = read_config(path)
    try:
        arch = architecture_of(hf)
        config = to_model_config(hf, dtype)
    except ValueError as err:  # a config that is read but not understood: say which file
        raise ValueError(f"{Path(path) / CONFIG_FILE}: {err}") from None
    rules = arch.rules(config)
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    with CheckpointReader(path) as stored:
        reader = RenamedReader(stored, arch.renames)
        wanted = {name for rule in rules for name in rule.hf}
        extra = sorted(n for n in reader.names() - wanted if not any(re.search(p, n) for p in arch.ignored))
        if extra:
            shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
            raise ValueError(f"{arch.name}: the checkpoint has tensors this mapping does not use: {shown}")
        missing = sorted(wanted - reader.names())
        if missing:
            raise ValueError(f"{arch.name}: the checkpoint lacks the tensors {missing[:8]}")
        return fill_model(abstract, rules, reader, mesh)


def to_hf_config(config: ModelConfig, architecture: str | None = None) -> dict:
    """The HF config.json of a jaxlm config: as ``architecture``, or the first of SUPPORTED that
    can express it. ValueError, with each architecture's reason, when none can."""
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED)}")
        return ARCHITECTURES[architecture].from_config(config)
    reasons = []
    for arch in ARCHITECTURES.values():
        try:
            return arch.from_config(config)
        except ValueError as e:
            reasons.append(str(e))
    raise ValueError("no supported Hugging Face architecture expresses this config:\n  " + "\n  ".join(reasons))


def save(model: LM, path: str | Path, architecture: str | None = None) -> None:
    """Writes ``config.json`` and ``model.safetensors`` to the folder ``path`` in the layout
    transformers loads (``architecture`` as in ``to_hf_config``), in the parameters' dtype. A
    tied head is not written, as save_pretrained does, nor are buffers transformers derives from
    the config (MiniMax's decays); load followed by save gives back every other original tensor
    bit for bit."""
    if not isinstance(model, LM):
        raise ValueError(f"model must be a jaxlm.models.LM, got {type(model).__name__}")
    hf = to_hf_config(model.config, architecture)
    tensors = model_tensors(model, ARCHITECTURES[hf["architectures"][0]].rules(model.config))
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    write_safetensors(tensors, folder / SINGLE_FILE)
