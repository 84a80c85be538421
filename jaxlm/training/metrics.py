"""Where a run's numbers go: metrics.jsonl (one JSON object per logged step), TensorBoard event
files, and loss.png at the end. Only process 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


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
        if self.enabled:
            self._file.close()
            self._board.close()


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
