"""An experiment's outputs: its rows as they come (kept, and appended to a CSV), legend handles
and a figure's last steps, and the end of every ``main`` (read the CSV back, print the tables,
draw, say what was written)."""

from __future__ import annotations

import csv
import pathlib
from typing import Callable


class RowWriter:
    """Collects rows in ``.rows`` and, given a path, writes each to that CSV as it comes (flushed,
    so a killed sweep keeps what it measured)."""

    def __init__(self, path: pathlib.Path | None, fields: list[str]):
        self.rows: list[dict] = []
        self._file = open(path, "w", newline="") if path else None
        self._writer = csv.DictWriter(self._file, fieldnames=fields) if self._file else None
        if self._writer:
            self._writer.writeheader()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write_again()

    def write_again(self) -> None:
        """Writes the last row once more (after it changed: readers keep the last of a key)."""
        if self._writer:
            self._writer.writerow(self.rows[-1])
            self._file.flush()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._file:
            self._file.close()


def line(color: str = "gray", ls: str = "-"):
    """A legend handle for a line style or colour."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, ls=ls, lw=2)


def point(marker: str = "o", filled: bool = True, color: str = "gray", **style):
    """A legend handle for a marker alone, filled or hollow."""
    from matplotlib.lines import Line2D

    return Line2D([], [], ls="none", marker=marker, color=color, **({} if filled else {"mfc": "none"}), **style)


def finish(fig, title: str, path: pathlib.Path | None):
    """Titles and lays out ``fig``, and saves it to ``path`` when one is given."""
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def report_and_plot(csv_path: pathlib.Path, png: pathlib.Path, read_rows: Callable[[pathlib.Path], list[dict]],
                    report: Callable[[list[dict]], None], plot: Callable[[list[dict], pathlib.Path], object]) -> None:
    """The end of an experiment's main: the tables and the figure from the CSV it wrote."""
    rows = read_rows(csv_path)
    report(rows)
    plot(rows, png)
    print(f"\nwrote {csv_path} and {png}")
