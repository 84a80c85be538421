"""The recall notebook's measurements (colab/04_recall_and_hybrids.ipynb): MQAR accuracy against
model width, trained through the recall experiment's own sweep, and the decode cache of the same
models against context.

Notebooks import this file from the checkout (``from experiments import recall_and_cache``, with
the repository root on sys.path). Nothing here trains or plots differently from the experiment:

- ``jobs`` builds ``recall_mqar.Job`` s from the notebook's sizes as ``recall_mqar.main`` builds them
  from its command line (batch = tokens per step / L, an evaluation every fifth of the budget,
  successive halving at a quarter of it unless the rates are vmapped);
- ``accuracy_sweep`` runs each through ``recall_mqar.run_job`` (``recall.train_sweep`` on
  ``recall.mqar_config``), whose CSV rows it returns in the grid's order;
- ``print_table``, ``write_csv`` and ``plot_accuracy`` are ``recall_mqar``'s table, CSV and figure;
- ``cache_rows`` measures each model's ``init_cache`` with ``long_context.cache_bytes`` (shapes
  only, nothing allocated), and ``plot_cache`` draws it against context in ``recall_mqar``'s styles.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # imported as a file: make ``experiments`` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import long_context, recall, recall_mqar, reporting
from jaxlm.models import count_params

# The lecture's five: softmax attention, linear attention, Mamba-2, Gated DeltaNet, and the 1:1 hybrid
# of Gated DeltaNet under softmax attention (names of recall.MIXERS).
MIXERS = ("attention", "linear_attention", "mamba2", "gated_deltanet", "gdn_attention")
CACHE_FIELDS = ["mixer", "layer_pattern", "d_model", "context", "kv_bytes", "recurrent_bytes", "total_bytes",
                "state_elements", "n_params"]


def _check_mixers(mixers: Sequence[str]) -> None:
    unknown = [m for m in mixers if m not in recall.MIXERS]
    if not mixers or unknown:
        raise ValueError(f"mixers must be a non-empty list of names of recall.MIXERS {list(recall.MIXERS)}, "
                         f"got {list(mixers)!r}")


def _check_positive_ints(name: str, values: Sequence[int]) -> None:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")


def jobs(mixers: Sequence[str], d_models: Sequence[int], *, seq_len: int, num_kv_pairs: int, vocab_size: int,
         tokens_per_step: int, lrs: Sequence[float], steps: int, vmap: bool = False, eval_every: int | None = None,
         eval_examples: int = 512, stop_at: float = 0.99, prune_at: int | None = None,
         seed: int = 0) -> list[recall_mqar.Job]:
    """One ``recall_mqar.Job`` per (width, mixer), in the script's grid order, with its defaults:
    batch = tokens_per_step // seq_len rows, an evaluation every steps // 5, successive halving at
    steps // 4 unless ``vmap`` (the rates then train together, each to the whole budget), and an
    early stop at ``stop_at`` accuracy (1 or more: never)."""
    _check_mixers(mixers)
    _check_positive_ints("d_models", d_models)
    _check_positive_ints("seq_len, num_kv_pairs, vocab_size, tokens_per_step",
                         [seq_len, num_kv_pairs, vocab_size, tokens_per_step])
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2 or not lrs:
        raise ValueError(f"need steps >= 2 and at least one learning rate, got steps={steps!r}, lrs={lrs!r}")
    recall.Task(seq_len, num_kv_pairs, vocab_size).mqar.check(seq_len)
    return [recall_mqar.Job(seq_len, num_kv_pairs, d_model, mixer, vocab_size, max(1, tokens_per_step // seq_len),
                            tuple(float(lr) for lr in lrs), steps, vmap, eval_every or max(1, steps // 5),
                            eval_examples, stop_at if stop_at < 1 else None,
                            None if vmap else (prune_at or max(1, steps // 4)), seed)
            for d_model in d_models for mixer in mixers]


def accuracy_sweep(grid: Sequence[recall_mqar.Job]) -> list[dict]:
    """Trains every job of ``grid`` with ``recall_mqar.run_job`` (it prints its progress) and returns
    all their CSV rows (one per learning rate; ``best`` marks the reported one) in the grid's order."""
    if not grid:
        raise ValueError("grid must hold at least one recall_mqar.Job")
    rows = [row for job in grid for row in recall_mqar.run_job(job)]
    return recall_mqar._ordered(rows, list(grid))


def best_rows(rows: list[dict]) -> list[dict]:
    """The reported row of each sweep: its best learning rate's."""
    return recall_mqar._best_rows(rows)


def print_table(rows: list[dict]) -> None:
    """recall_mqar's markdown table: best accuracy (and its rate) per mixer and setting."""
    recall_mqar._table(rows)


def write_csv(rows: list[dict], path: pathlib.Path) -> pathlib.Path:
    """The rows as recall_mqar's CSV (the script's columns), at ``path``."""
    recall_mqar._write_csv(rows, path)
    return path


def plot_accuracy(rows: list[dict], path: pathlib.Path) -> pathlib.Path:
    """recall_mqar's figure, best accuracy against d_model with one panel per L, saved to ``path``.
    The script's plot selects matplotlib's Agg backend; the caller's backend (a notebook's inline
    one) is put back afterwards. pyplot settles on the caller's backend first: pyplot loads its
    backend at the first figure, and a notebook's inline backend loaded after Agg would not hook
    into the notebook, so no later figure would show."""
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    plt.switch_backend(backend)
    try:
        recall_mqar._plot(rows, pathlib.Path(path))
    finally:
        matplotlib.use(backend)
    return pathlib.Path(path)


def cache_rows(mixers: Sequence[str], d_models: Sequence[int], vocab_size: int, contexts: Sequence[int]) -> list[dict]:
    """Per (mixer, width, context): the bytes of the recall model's decode cache for one row of
    ``context`` tokens, split as ``long_context.cache_bytes`` splits it (the attention layers' KV
    caches; the recurrent states with their conv states), from shapes alone; with the float32
    elements of its recurrent states (``recall.recurrent_state_elements``) and its parameters."""
    _check_mixers(mixers)
    _check_positive_ints("d_models", d_models)
    _check_positive_ints("contexts", contexts)
    rows = []
    for d_model in d_models:
        for mixer in mixers:
            config = recall.mqar_config(mixer, d_model=d_model, vocab_size=vocab_size)
            state, n_params = recall.recurrent_state_elements(config), count_params(config)
            for context in contexts:
                size = long_context.cache_bytes(config, context)
                rows.append(dict(mixer=mixer, layer_pattern=config.layer_pattern, d_model=d_model, context=context,
                                 kv_bytes=size["kv"], recurrent_bytes=size["recurrent"], total_bytes=size["total"],
                                 state_elements=state, n_params=n_params))
    return rows


def cache_at(rows: list[dict], mixer: str, d_model: int) -> dict[int, dict]:
    """{context: row} of one model's cache rows."""
    out = {r["context"]: r for r in rows if r["mixer"] == mixer and r["d_model"] == d_model}
    if not out:
        raise ValueError(f"no cache rows for mixer {mixer!r} at d_model {d_model}")
    return out


def plot_cache(rows: list[dict], path: pathlib.Path | None = None):
    """Decode cache bytes against context, log-log, one panel per width and one line per mixer in
    recall_mqar's colours and line styles; returns the figure (saved to ``path`` when given)."""
    import matplotlib.pyplot as plt

    widths = sorted({r["d_model"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(4.6 * len(widths), 4.4), squeeze=False, sharey=True)
    for ax, d_model in zip(axes[0], widths):
        for mixer in dict.fromkeys(r["mixer"] for r in rows if r["d_model"] == d_model):
            by_context = sorted(cache_at(rows, mixer, d_model).items())
            colour, style, marker = recall_mqar.STYLE[mixer]
            ax.loglog([c for c, _ in by_context], [r["total_bytes"] for _, r in by_context], linestyle=style,
                      marker=marker, color=colour, label=recall_mqar.LABELS[mixer])
        ax.set_title(f"d_model = {d_model}")
        ax.set_xlabel("context (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("decode cache, bytes per row (float32)")
    axes[0][-1].legend(fontsize=8, loc="best")
    return reporting.finish(fig, "the recall models' decode caches against context", path)
