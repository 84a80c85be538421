"""The MQAR training harness: recall models, a learning-rate sweep and recall accuracy.

Used by ``experiments/recall_mqar.py`` and ``experiments/hybrid_ratio.py``, and meant to be called
from a notebook rather than copied. ``experiments/`` is a package (it has an ``__init__.py``), so
from a checkout, with the repository root on ``sys.path``:

    import sys; sys.path.insert(0, "/path/to/jaxlm")          # the repository root
    from experiments import recall
    config = recall.mqar_config("gated_deltanet", d_model=64, vocab_size=128)
    task = recall.Task(seq_len=64, num_kv_pairs=4, vocab_size=128)
    result = recall.train_sweep(config, task, lrs=(1e-3, 3e-3, 1e-2), steps=1000, batch_size=32,
                                eval_every=200, prune_at=250)
    best = result.best()       # a Run: best.lr, best.accuracy, best.history, ...

The scripts add the root themselves when run as files (``python experiments/recall_mqar.py``).

How a sweep trains: each rate runs the library's own train step
(``jaxlm.training.step.make_train_step``, with ``training.optimizer``'s AdamW, warmup and cosine
schedule) built from a traced learning rate, so one compiled program serves every rate. All rates
start from the same initial parameters and see the same batches, so they differ only in the rate.
They run one after another, optionally with successive halving (``prune_at``), or together under
``jax.vmap`` over a leading axis of parameters, optimizer states and rates (``vmap=True``; on the
2-core CPU it took 0.9-2.05x the time per rate of one after another, see RESULTS.md). Accuracy is the
fraction of queried keys whose value is the argmax of the logits, on ``eval_examples`` rows of
MQAR's validation stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.data import MQARBatches, MQARConfig
from jaxlm.models import LM, ModelConfig, count_params
from jaxlm.training import optimizer
from jaxlm.training.step import LossWeights, TrainState, make_train_step, masked_cross_entropy

# The mixers of the recall grid: name -> layer_pattern, one letter per layer (cycled over
# n_layers). A 2-layer "GA" is one Gated DeltaNet layer under one attention layer.
MIXERS = {
    "attention": "A",
    "linear_attention": "N",
    "mamba2": "M",
    "gla": "V",
    "deltanet": "R",
    "gated_deltanet": "G",
    "gdn_attention": "GA",
    "gdn_swa": "GW",
}
HEAD_DIM = 32  # every mixer's head width (GLA: its keys are half, as fla's); heads = d_model / 32
SWA_WINDOW = 16  # the sliding window of the GDN + SWA hybrid, in tokens (as preset gdn_h1 at size tiny)
MAMBA_D_STATE = 16  # with head_dim 64 and expand 2: a state of 32·d_model per layer, as GDN's
# The chunk forms' chunk: at T <= 256 on the 2-core CPU, 32 ran the recurrent mixers' steps
# 1.1-2x faster than the default 64 (the same math; an execution choice only).
CHUNK_SIZE = 32
EVAL_BATCH = 64  # rows per evaluation call


@dataclass(frozen=True)
class Task:
    """One MQAR setting: rows of seq_len tokens holding num_kv_pairs pairs from vocab_size ids."""

    seq_len: int
    num_kv_pairs: int
    vocab_size: int = 512
    power_a: float = 0.01

    @property
    def mqar(self) -> MQARConfig:
        return MQARConfig(vocab_size=self.vocab_size, num_kv_pairs=self.num_kv_pairs, power_a=self.power_a)


def mqar_config(mixer: str | None = None, *, d_model: int, vocab_size: int, n_layers: int = 2,
                layer_pattern: str | None = None, ffn_pattern: str = "-", **overrides) -> ModelConfig:
    """The recall model for one mixer of MIXERS (or an explicit ``layer_pattern``): n_layers
    mixer blocks with no feed-forward (as Zoology's MQAR models), heads of width HEAD_DIM."""
    if (mixer is None) == (layer_pattern is None):
        raise ValueError("give exactly one of mixer (a name of MIXERS) and layer_pattern")
    if mixer is not None and mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {list(MIXERS)}, got {mixer!r}")
    if d_model % HEAD_DIM:
        raise ValueError(f"d_model must be a multiple of {HEAD_DIM} (the head width), got {d_model}")
    heads = d_model // HEAD_DIM
    fields = dict(
        vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
        layer_pattern=MIXERS[mixer] if mixer is not None else layer_pattern, ffn_pattern=ffn_pattern,
        n_heads=heads, linear_n_heads=heads, window=SWA_WINDOW, mamba_d_state=MAMBA_D_STATE,
        chunk_size=CHUNK_SIZE,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def recurrent_state_elements(config: ModelConfig) -> int:
    """Float32 elements of all recurrent states (not conv states, not KV caches) for one row."""
    model = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))
    cache = jax.eval_shape(lambda: model.init_cache(batch_size=1, max_len=1))
    return int(sum(int(np.prod(c.state.shape)) for c in cache if hasattr(c, "state")))


@dataclass
class Run:
    """One learning rate's training run."""

    lr: float
    steps: int  # optimizer steps run: the budget, or fewer if it stopped early or was pruned
    accuracy: float  # at its last step, on the validation rows
    val_loss: float  # mean nll of the answers on the validation rows, at its last step
    loss: float  # the last step's train loss (mean nll at the answers)
    history: list[tuple[int, float, float]]  # (step, accuracy, validation loss) at each evaluation
    seconds: float  # wall time of its steps after the first (which compiles), evaluations excluded
    pruned: bool = False  # stopped at the prune step: another rate had the lower validation loss


@dataclass
class SweepResult:
    """One model trained at each of n learning rates on one task."""

    config: ModelConfig
    task: Task
    budget: int  # the schedule's length in steps
    batch_size: int
    runs: list[Run]
    vmapped: bool
    n_params: int
    compile_s: float  # the first step's wall time (compilation and one step)

    def best(self) -> Run:
        """The run of highest accuracy that was not pruned (a non-finite one counts as 0)."""
        return max((r for r in self.runs if not r.pruned), key=lambda r: np.nan_to_num(r.accuracy, nan=0.0))

    @property
    def seconds_per_step(self) -> float:
        """Wall seconds per optimizer step of one learning rate (a vmapped step trains n)."""
        steps = sum(r.steps - 1 for r in self.runs)
        seconds = self.runs[0].seconds if self.vmapped else sum(r.seconds for r in self.runs)
        return seconds / max(1, steps)


def _batch_dict(batch) -> dict:
    return {"tokens": batch.tokens, "targets": batch.targets, "segment_ids": batch.segment_ids,
            "loss_mask": batch.loss_mask}


def _replicate(tree, n: int):
    return jax.tree.map(lambda x: jnp.array(jnp.broadcast_to(x, (n, *x.shape))), tree)


def make_train_step_lr(graphdef, *, steps: int, warmup: int, weight_decay: float) -> Callable:
    """(TrainState, peak lr, batch, step) -> (TrainState, metrics): the trainer's step, its
    schedule and AdamW built from a traced learning rate, so that one program serves every rate."""

    def step_fn(state: TrainState, lr: jax.Array, batch: dict, step: jax.Array):
        schedule = optimizer.learning_rate_schedule(lr, warmup, steps)
        tx = optimizer.adamw(schedule, weight_decay=weight_decay)
        return make_train_step(graphdef, tx, schedule, LossWeights(), 1, False)(state, batch, step)

    return step_fn


def make_accuracy(graphdef) -> Callable:
    """(params, others, batch) -> (answers recalled, answers, Σ nll of the answers): recall is the
    argmax of the logits at the queried keys."""

    def accuracy(params, others, batch):
        out = nnx.merge(graphdef, params, others)(batch["tokens"], segment_ids=batch["segment_ids"])
        answer = batch["loss_mask"] > 0
        nll, _ = masked_cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        return jnp.sum((jnp.argmax(out.logits, -1) == batch["targets"]) & answer), jnp.sum(answer), nll

    return accuracy


def evaluation_batches(task: Task, *, examples: int, batch_size: int, seed: int = 0) -> list[dict]:
    """ceil(examples / batch_size) batches of MQAR's validation stream (disjoint from train)."""
    source = MQARBatches(task.mqar, seq_len=task.seq_len, batch_size=batch_size, seed=seed, split="validation")
    return [_batch_dict(next(source)) for _ in range(-(-examples // batch_size))]


class _Training:
    """The run of one group of rates (one rate, or all of them vmapped), advanced in stages."""

    def __init__(self, rates: tuple[float, ...], init: TrainState, vmap: bool, task: Task, batch_size: int, seed: int):
        self.rates, self.vmap = rates, vmap
        self.state = _replicate(init, len(rates)) if vmap else jax.tree.map(jnp.array, init)
        self.lr = jnp.asarray(rates if vmap else rates[0], jnp.float32)
        self.train = MQARBatches(task.mqar, seq_len=task.seq_len, batch_size=batch_size, seed=seed, split="train")
        self.done, self.seconds, self.metrics, self.stopped = 0, 0.0, None, False
        self.history: list[tuple[int, np.ndarray, np.ndarray]] = []  # (step, accuracy [n], val loss [n])

    def runs(self, pruned: bool = False) -> list[Run]:
        loss = np.atleast_1d(np.asarray(self.metrics["loss"]))
        _, acc, val = self.history[-1]
        return [Run(rate, self.done, float(acc[i]), float(val[i]), float(loss[i]),
                    [(s, float(a[i]), float(v[i])) for s, a, v in self.history], self.seconds, pruned)
                for i, rate in enumerate(self.rates)]


def train_sweep(
    config: ModelConfig,
    task: Task,
    *,
    lrs: Sequence[float],
    steps: int,
    batch_size: int,
    vmap: bool = False,
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.1,
    eval_every: int | None = None,
    eval_examples: int = 1024,
    stop_at: float | None = None,
    prune_at: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> SweepResult:
    """Trains ``config`` on ``task`` for ``steps`` steps of ``batch_size`` rows at each rate of ``lrs``.

    All rates start from the same initial parameters and see the same batches. With ``vmap``
    they train together in one vmapped program; otherwise one after another through one compiled
    step (the rate is an argument). Every ``eval_every`` steps and at the end each rate's accuracy
    is measured on ``eval_examples`` validation rows; with ``stop_at`` a run stops at an
    evaluation where it (vmapped: every rate) has reached that accuracy. With ``prune_at``
    (successive halving, one after another only) every rate trains to that step, and only the
    one of lowest validation loss there goes on to ``steps``; each rate's schedule is the full
    budget's, so the survivor's run is exactly the one it would have been without pruning.
    """
    if config.vocab_size != task.vocab_size:
        raise ValueError(f"config.vocab_size={config.vocab_size} must equal task.vocab_size={task.vocab_size}")
    if steps < 2 or batch_size < 1 or not lrs:
        raise ValueError(f"need steps >= 2, batch_size >= 1 and some lrs, got {steps}, {batch_size}, {lrs}")
    if prune_at is not None and (vmap or not 0 < prune_at < steps):
        raise ValueError(f"prune_at must be in (0, steps={steps}) and needs vmap=False, got {prune_at}, vmap={vmap}")
    task.mqar.check(task.seq_len)
    lrs = tuple(float(lr) for lr in lrs)
    graphdef, params, others = nnx.split(LM(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    init_tx = optimizer.adamw(optimizer.learning_rate_schedule(1.0, 1, steps), weight_decay=weight_decay)
    init = TrainState(params, others, init_tx.init(params))
    step_fn = make_train_step_lr(graphdef, steps=steps, warmup=max(1, int(warmup_fraction * steps)),
                                 weight_decay=weight_decay)
    accuracy_fn = make_accuracy(graphdef)
    if vmap:
        step_fn, accuracy_fn = jax.vmap(step_fn, in_axes=(0, 0, None, None)), jax.vmap(accuracy_fn, in_axes=(0, 0, None))
    step_fn = jax.jit(step_fn, donate_argnums=(0,))
    accuracy_fn = jax.jit(accuracy_fn)
    evaluation = evaluation_batches(task, examples=eval_examples, batch_size=min(EVAL_BATCH, eval_examples), seed=seed)
    timing = {"compile_s": None}

    def evaluate(run: _Training) -> None:
        correct = total = nll = 0
        for batch in evaluation:
            c, t, n = accuracy_fn(run.state.params, run.state.others, batch)
            correct, total, nll = correct + np.asarray(c), total + np.asarray(t), nll + np.asarray(n)
        run.history.append((run.done, np.atleast_1d(correct / total), np.atleast_1d(nll / total)))

    def advance(run: _Training, until: int, name: str) -> None:
        """Trains ``run`` on to step ``until`` (or an early stop), evaluating on the way and at ``until``."""
        start = time.perf_counter()
        eval_seconds = 0.0
        while run.done < until:
            run.state, run.metrics = step_fn(run.state, run.lr, _batch_dict(next(run.train)), jnp.int32(run.done))
            if run.done == 0:
                jax.block_until_ready(run.metrics)
                if timing["compile_s"] is None:
                    timing["compile_s"] = time.perf_counter() - start
                start = time.perf_counter()
            run.done += 1
            if run.done == until or (eval_every and run.done % eval_every == 0):
                jax.block_until_ready(run.state)  # the steps' time is not the evaluation's
                eval_start = time.perf_counter()
                evaluate(run)
                eval_seconds += time.perf_counter() - eval_start
                _, acc, val = run.history[-1]
                if log:
                    loss = np.atleast_1d(np.asarray(run.metrics["loss"]))
                    log(f"  {name} step {run.done:6d}  loss " + " ".join(f"{x:6.3f}" for x in loss)
                        + "  val " + " ".join(f"{x:6.3f}" for x in val) + "  acc " + " ".join(f"{x:.3f}" for x in acc)
                        + f"  ({run.seconds + time.perf_counter() - start - eval_seconds:.0f} s)")
                if stop_at is not None and np.all(acc >= stop_at):
                    run.stopped = True
                    break
        run.seconds += time.perf_counter() - start - eval_seconds

    def label(rates: tuple[float, ...]) -> str:
        return ("lrs " if len(rates) > 1 else "lr ") + " ".join(f"{r:g}" for r in rates)

    if vmap:
        group = _Training(lrs, init, True, task, batch_size, seed)
        advance(group, steps, label(lrs))
        runs = group.runs()
    else:
        groups = [_Training((lr,), init, False, task, batch_size, seed) for lr in lrs]
        for g in groups:
            advance(g, prune_at or steps, label(g.rates))
        keep = groups
        if prune_at is not None:
            # A run that stopped early (it reached stop_at) is finished; otherwise the lowest loss goes on.
            finished = [g for g in groups if g.stopped]
            keep = finished or [min(groups, key=lambda g: np.nan_to_num(g.history[-1][2][0], nan=np.inf))]
            for g in keep:
                if not finished:
                    if log:
                        log(f"  {label(g.rates)} continues: the lowest validation loss at step {prune_at}")
                    advance(g, steps, label(g.rates))
        runs = [r for g in groups for r in g.runs(pruned=g not in keep)]
    return SweepResult(config, task, steps, batch_size, runs, vmap, count_params(config), timing["compile_s"])
