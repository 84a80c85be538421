"""Hugging Face datasets, streamed: `hf:<repo>[#config=<name>,column=<text column>,buffer=<n>]`.

Needs the optional `datasets` package and a network connection; it is imported only here, when
such a spec is used. The train split is the dataset's `train`; the validation split is the first
of `validation`, `valid`, `val`, `test` that the dataset has. Shuffling uses the stream's shuffle
buffer (`buffer`, 10000 documents by default) seeded by (seed, epoch), and resuming skips the
documents already read, so a restored iterator continues exactly (at the cost of re-reading).
"""

from __future__ import annotations

from collections.abc import Iterator

from jaxlm.data.corpus import StreamingCorpus, fingerprint_of, parse_options

_VALIDATION_NAMES = ("validation", "valid", "val", "test")


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "streaming a Hugging Face dataset needs the optional package `datasets`: "
            "pip install datasets"
        ) from None
    return datasets


def load_hf(repo: str, options: dict[str, str], split: str, source: str) -> StreamingCorpus:
    """Open `repo` for streaming; errors name the spec and say what is missing."""
    opts = parse_options(options, {"config": str, "column": str, "buffer": int}, source)
    if split == "all":
        raise ValueError(
            f"data {source!r}: split='all' is not defined for a streamed dataset; use 'train' or 'validation'"
        )
    if not repo:
        raise ValueError(f"data {source!r}: expected hf:<owner>/<dataset>, e.g. hf:roneneldan/TinyStories")
    datasets = _import_datasets()
    config, column, buffer = opts.get("config"), opts.get("column", "text"), opts.get("buffer", 10_000)
    try:
        hf_split = "train"
        if split == "validation":
            available = datasets.get_dataset_split_names(repo, config)
            matches = [s for s in _VALIDATION_NAMES if s in available]
            if not matches:
                raise ValueError(
                    f"data {source!r}: no validation split; the dataset has {available}, "
                    f"expected one of {_VALIDATION_NAMES}"
                )
            hf_split = matches[0]
        dataset = datasets.load_dataset(repo, config, split=hf_split, streaming=True)
    except ValueError:
        raise
    except Exception as e:  # network, authentication, unknown repository
        raise RuntimeError(
            f"data {source!r}: could not open the dataset from the Hugging Face Hub "
            f"(offline, or no such dataset/config?): {type(e).__name__}: {e}"
        ) from e

    def stream(seed: int | None, epoch: int, start: int) -> Iterator[str]:
        ds = dataset
        if seed is not None:
            ds = ds.shuffle(seed=seed, buffer_size=buffer)
            ds.set_epoch(epoch)
        if start:
            ds = ds.skip(start)
        for example in ds:
            if column not in example:
                raise ValueError(
                    f"data {source!r}: examples have no column {column!r}; they have "
                    f"{sorted(example)}; pass #column=<name>"
                )
            yield example[column]

    return StreamingCorpus(source, stream, fingerprint_of("hf", repo, config, hf_split, column))
