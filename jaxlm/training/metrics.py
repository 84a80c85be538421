"""Where a run's numbers go: metrics.jsonl (one JSON object per logged step), TensorBoard event
files, and loss.png at the end. Only process 0 writes.

The train steps' metrics stay on the device (``PendingMetrics``) until the loop reads a window
of them back in one transfer: reading every step would make the host wait for each step to
finish before it could dispatch the next.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

METRICS_FILE = "metrics.jsonl"
MAX_LOG_LOSS = 50.0  # perplexity is reported as exp(min(loss, this)), so that it stays finite


class PendingMetrics:
    """The metrics of the train steps dispatched since the last ``read``, still on the device."""

    def __init__(self):
        self._steps: list[int] = []
        self._values: list[dict[str, jax.Array]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, values: dict[str, jax.Array]) -> None:
        self._steps.append(step)
        self._values.append(values)

    def read(self) -> list[tuple[int, dict[str, float]]]:
        """[(step, {name: value})] in step order, fetched in one device_get (which waits for the
        steps to finish); the window is empty afterwards."""
        host = jax.device_get(self._values)
        records = [(step, {k: float(v) for k, v in values.items()}) for step, values in zip(self._steps, host)]
        self._steps, self._values = [], []
        return records


def first_non_finite(records: list[tuple[int, dict[str, float]]], key: str = "loss") -> int | None:
    """The index of the first record whose ``key`` is NaN or infinite; None when all are finite."""
    return next((i for i, (_, values) in enumerate(records) if not math.isfinite(values[key])), None)


def with_rates(values: dict[str, float], *, seconds_per_step: float, tokens_per_step: int, flops_per_step: float,
               peak_flops: float) -> dict[str, float]:
    """``values`` plus perplexity, tokens_per_second and mfu (the step's FLOPs per second over
    ``peak_flops``, the devices' total peak)."""
    return {
        **values,
        "perplexity": math.exp(min(values["loss"], MAX_LOG_LOSS)),
        "tokens_per_second": tokens_per_step / seconds_per_step,
        "mfu": flops_per_step / seconds_per_step / peak_flops,
    }


class MetricsLog:
    """Appends to metrics.jsonl and the TensorBoard events of ``run_dir``. A run resumed at
    ``resume_step`` first drops what was logged after that step (the steps it will replay), so
    that each step appears once."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._file = self._board = None
        if not enabled:
            return
        _drop_records_after(self.run_dir / METRICS_FILE, resume_step)
        self._file = open(self.run_dir / METRICS_FILE, "a")
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides the events of steps >= it written before this writer.
        self._board = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, values: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._board.add_scalar(f"{split}/{name}", float(value), step)

    def close(self) -> None:
        if self.enabled and not self._file.closed:
            self._file.close()
            self._board.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            raise ValueError(f"{path} line {number} is not a jaxlm metrics record: {line[:80]!r}")
        records.append(record)
    return records


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrites metrics.jsonl without the records of steps after ``step`` (atomically)."""
    if not path.exists():
        return
    records = _parse_records(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) < len(records):
        partial = path.with_suffix(".jsonl.partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in kept))
        partial.replace(path)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl, in the order they were logged ([] without the file)."""
    path = Path(run_dir) / METRICS_FILE
    return _parse_records(path) if path.exists() else []


def plot_loss(run_dir: Path) -> Path:
    """loss.png: train and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("validation", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r.get("split") == split and math.isfinite(r.get("loss", math.nan))]
        if points:
            ax.plot(*zip(*points), style, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
