"""``python -m jaxlm.convert --from-hf DIR --out CKPT``: a Hugging Face checkpoint folder as a
jaxlm run folder that training can start from (``python -m jaxlm.train --init-from CKPT``) and
generation can load (``python -m jaxlm.generate --checkpoint CKPT``).

The model comes from ``jaxlm.interop.hf.load``; the folder is written by the training package's
``save_pretrained_model`` (config.json and checkpoints/0/, parameters and other variables, no
optimizer state). The HF folder's ``tokenizer.json`` is copied into CKPT and recorded as the
tokenizer spec; without one the spec is recorded as null (and a note says so), and generation then
needs ``--tokenizer``.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Literal, Sequence

from jaxlm.interop import hf

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class ConvertArgs:
    """Convert a Hugging Face checkpoint (config.json + *.safetensors) into a jaxlm run folder."""

    from_hf: str
    """The Hugging Face checkpoint folder."""
    out: str
    """The jaxlm folder to write (must not exist yet)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter and compute dtype of the converted model."""


def convert(from_hf: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Loads ``from_hf`` with ``hf.load`` in ``dtype`` and writes it to the new folder ``out``."""
    from jaxlm.training.checkpointing import save_pretrained_model

    source, out = Path(from_hf), Path(out).absolute()
    if not source.is_dir():
        what = "is a file" if source.exists() else "does not exist"
        raise ValueError(f"--from-hf {source} {what}; pass the Hugging Face checkpoint folder "
                         "(config.json and *.safetensors)")
    if out.exists():
        raise ValueError(f"--out {out} already exists; pick a new folder")
    model = hf.load(source, dtype=dtype)  # every problem of the folder is found before --out is made
    out.mkdir(parents=True)
    tokenizer = None
    if (source / TOKENIZER_FILE).is_file():
        shutil.copyfile(source / TOKENIZER_FILE, out / TOKENIZER_FILE)
        tokenizer = str(out / TOKENIZER_FILE)
    else:
        print(f"note: {source} has no {TOKENIZER_FILE}, so none is recorded; give python -m jaxlm.generate "
              "--tokenizer", file=sys.stderr)
    return save_pretrained_model(model, tokenizer, out)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jaxlm.convert``: a user's mistake ends in one ``error:`` line, exit status 1."""
    import tyro

    from jaxlm.cli import report_user_errors

    args = tyro.cli(ConvertArgs, args=argv)
    print(f"wrote {report_user_errors(lambda: convert(args.from_hf, args.out, args.dtype))}")


if __name__ == "__main__":
    main()
