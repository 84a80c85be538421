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
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._file = open(self.run_dir / METRICS_FILE, "a") if enabled else None
        self._board = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._board = SummaryWriter(str(self.run_dir / "tensorboard"))

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


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


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
