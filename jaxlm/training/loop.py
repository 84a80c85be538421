"""The training loop, top to bottom: data, model, optimizer, restore, steps, evaluation,
checkpoints, and the closing sample. ``python -m jaxlm.train`` parses TrainArgs and calls ``train``.

The host never waits for a step it has just dispatched: it packs and places the next batch while
the step runs, and reads the metrics back every ``--log-every`` steps (and before every
evaluation and checkpoint, so that nothing is saved past a non-finite loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxlm import data, sharding
from jaxlm.axis_names import CONTEXT
from jaxlm.generate import generate
from jaxlm.models import LM, ModelConfig, count_params, preset
from jaxlm.models.flops import flops_per_token
from jaxlm.training import checkpointing, optimizer, run_folder
from jaxlm.training.args import TrainArgs
from jaxlm.training.metrics import MAX_LOG_LOSS, MetricsLog, PendingMetrics, first_non_finite, plot_loss, with_rates
from jaxlm.training.peak import peak_flops_per_second
from jaxlm.training.step import LossWeights, TrainState, init_state, jit_steps


class NonFiniteLoss(RuntimeError):
    """A train loss was NaN or infinite; the message names the step and the last checkpoint."""


class _StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can save the step it is on and exit cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


class Stopped(Exception):
    """A SIGTERM or SIGINT stopped the run once its step was saved. ``exit_status`` is the
    shell's convention for that signal, 128 + its number, so a scheduler sees the preemption."""

    def __init__(self, signal_name: str, step: int, checkpoints: Path):
        self.exit_status = 128 + signal.Signals[signal_name].value
        super().__init__(f"{signal_name}: saved step {step} to {checkpoints}; rerun to resume")


def _check_args(args: TrainArgs, mesh) -> None:
    if mesh.shape[CONTEXT] > 1:  # the axis is named for what is planned; nothing splits along it yet
        raise ValueError(f"--mesh {args.mesh!r}: context parallelism is not implemented yet, so a {CONTEXT} "
                         f"axis over {mesh.shape[CONTEXT]} devices would only repeat the work; use data, fsdp, "
                         "expert and tensor")
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "eval_every", "log_every",
                 "eval_batches", "keep_checkpoints", "sample_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup_steps() < args.steps:
        raise ValueError(f"--warmup must be in [0, --steps={args.steps}), got {args.warmup}")
    # (flag, lower bound, whether the bound itself is allowed), each a finite float.
    for name, low, inclusive in (("lr", 0.0, False), ("clip_norm", 0.0, False), ("weight_decay", 0.0, True),
                                 ("load_balancing", 0.0, True), ("router_z", 0.0, True),
                                 ("selection_bias_rate", 0.0, True)):
        value = getattr(args, name)
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number {bound}, got {value}")
    rows_per_micro, rem = divmod(args.batch_size, args.grad_accum)
    if rem:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum}")
    shards = sharding.batch_shards(mesh)
    if rows_per_micro % shards:
        raise ValueError(
            f"--batch-size / --grad-accum = {rows_per_micro} rows must be a multiple of the mesh's "
            f"data × fsdp = {shards}"
        )
    if args.batch_size % jax.process_count():
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {jax.process_count()} processes")


def _starting_point(args: TrainArgs) -> tuple[ModelConfig | None, str | None]:
    """(the model config, the tokenizer spec) of --init-from, or (None, --tokenizer) without it."""
    if not args.init_from:
        return None, args.tokenizer
    folder = Path(args.init_from)
    record = checkpointing.read_run_config(folder)
    return ModelConfig().replace(**record["model"]), args.tokenizer or checkpointing.run_tokenizer_spec(folder, record)


def _model_config(args: TrainArgs, vocab_size: int, base: ModelConfig | None) -> ModelConfig:
    """The preset with the tokenizer's vocabulary (or --init-from's config) and the overrides."""
    overrides = {"dtype": args.dtype, "remat": args.remat, **args.model_overrides()}
    if base is not None:
        config = base.replace(**overrides)
    else:
        config = preset(args.preset, args.size, **{"vocab_size": vocab_size, **overrides})
    if config.vocab_size < vocab_size:
        raise ValueError(f"--model.vocab-size {config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return config


def _abstract_state(config: ModelConfig, args: TrainArgs, tx, mesh):
    """(the model as shapes only, its graphdef, the TrainState as shapes, the state's shardings):
    nothing is allocated until the state is restored or created."""
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(args.seed)))
    graphdef, abstract_state = init_state(abstract, tx)
    shardings = TrainState(*(sharding.state_shardings(part, mesh) for part in abstract_state))
    return abstract, graphdef, abstract_state, shardings


def _fresh_state(config: ModelConfig, args: TrainArgs, tx, shardings: TrainState) -> TrainState:
    """A new TrainState placed in ``shardings``: random parameters created by a jitted init, or
    --init-from's parameters with a new optimizer state."""
    if args.init_from:
        model, _ = checkpointing.load_trained_model(args.init_from)
        _, params, others = nnx.split(model, nnx.Param, ...)
        return TrainState(jax.device_put(params, shardings.params), jax.device_put(others, shardings.others),
                          jax.jit(tx.init, out_shardings=shardings.opt_state)(params))

    def create():
        return init_state(LM(config, rngs=nnx.Rngs(args.seed)), tx)[1]

    return jax.jit(create, out_shardings=shardings)()


def _evaluate(evaluate, state, batches, mesh) -> float:
    """The mean validation loss per supervised token; the batches' sums come back in one transfer."""
    sums = jax.device_get([evaluate(state, _device_batch(batch, mesh)) for batch in batches])
    nll, count = 0.0, 0.0
    for n, c in sums:
        nll, count = nll + float(n), count + float(c)
    return nll / max(count, 1.0)


def _device_batch(batch: data.Batch, mesh) -> dict:
    return {name: sharding.global_batch(np.asarray(value), mesh) for name, value in batch._asdict().items()}


def _write_sample(run_dir: Path, graphdef, state: TrainState, tokenizer, args: TrainArgs, lead: bool) -> str:
    model = nnx.merge(graphdef, *jax.device_get((state.params, state.others)))
    prompt = np.asarray(tokenizer.encode(args.sample_prompt), np.int32)[None]
    if prompt.size == 0:
        prompt = np.zeros((1, 1), np.int32)
    out = generate(model, prompt, args.sample_tokens, temperature=0.8, top_p=0.95, rng=jax.random.key(args.seed))
    text = tokenizer.decode(np.asarray(out[0]).tolist())
    if lead:
        (run_dir / "sample.txt").write_text(text)
    return text


def train(args: TrainArgs) -> Path:
    """Runs (or resumes) the job of ``args``; returns the run folder. A SIGTERM or SIGINT saves
    the step it arrives at, then raises Stopped. Raises NonFiniteLoss when a train loss is NaN or
    infinite (no checkpoint of that step or later is written) and ValueError for bad arguments;
    the checkpoint manager, metrics files, progress bar and signal handlers are closed either way."""
    mesh = sharding.make_mesh(args.mesh)
    run_dir = args.run_dir()
    args = run_folder.inherit_warmup(args, run_dir)
    _check_args(args, mesh)
    lead = jax.process_index() == 0
    run_folder.check_usable(run_dir, lead)
    base_config, tokenizer_spec = _starting_point(args)
    stream = data.build(
        args.data, tokenizer_spec, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    tokenizer = stream.tokenizer
    val_batches = data.validation_batches(
        args.data, tokenizer_spec, seq_len=args.seq_len, batch_size=args.batch_size, num_batches=args.eval_batches,
        seed=args.seed, process_index=jax.process_index(), process_count=jax.process_count(),
    )
    config = _model_config(args, tokenizer.vocab_size, base_config)
    recorded_args = _jsonable(dataclasses.replace(args, warmup=args.warmup_steps()))
    data_identity = run_folder.data_identity(args.data, stream.fingerprint)
    run_folder.check_same_run(run_dir, config, tokenizer.spec, recorded_args, data_identity)

    schedule = optimizer.learning_rate_schedule(args.lr, args.warmup_steps(), args.steps, args.schedule)
    tx = optimizer.adamw(schedule, weight_decay=args.weight_decay, clip_norm=args.clip_norm)
    weights = LossWeights(args.load_balancing, args.router_z, args.selection_bias_rate)
    peak, peak_source = peak_flops_per_second(dtype=args.dtype)  # outside the mesh: it probes one device
    # Everything entered here is closed in reverse order however train() ends: the progress bar,
    # the signal handlers, the metrics files and TensorBoard writer, and the checkpoint manager
    # (whose close waits for the saves in flight).
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(jax.set_mesh(mesh))
        abstract_model, graphdef, abstract_state, shardings = _abstract_state(config, args, tx, mesh)
        train_step, evaluate = jit_steps(
            graphdef, shardings, tx, schedule, weights, grad_accum=args.grad_accum,
            use_selection_bias=config.use_selection_bias, mesh=mesh,
        )
        if lead:  # only once the model is built: a config that fails to build leaves no record
            checkpointing.write_run_config(run_dir, config, tokenizer.spec, recorded_args, data_identity)
            checkpointing.save_tokenizer(run_dir, tokenizer)
        mgr = cleanup.enter_context(checkpointing.open_manager(run_dir, args.keep_checkpoints))
        start = 0
        restored = checkpointing.restore_latest(mgr, checkpointing.abstract_like(abstract_state, shardings))
        if restored is None:
            state = _fresh_state(config, args, tx, shardings)
        else:
            state, meta = restored
            start = meta["step"]
            stream.restore(meta["data"])
            if lead:
                tqdm.write(f"resumed {run_dir} at step {start}")
        log = cleanup.enter_context(MetricsLog(run_dir, enabled=lead, resume_step=start))
        stop = cleanup.enter_context(_StopSignal())

        n_params = count_params(abstract_model)
        tokens_per_step = args.batch_size * args.seq_len
        flops_per_step = flops_per_token(config, args.seq_len) * tokens_per_step
        rates = dict(tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
                     peak_flops=peak * jax.device_count())
        if lead:
            tqdm.write(
                f"{args.preset}-{args.size}: {n_params / 1e6:.1f}M parameters, {config.n_layers} layers "
                f"{''.join(m for m, _ in config.layer_kinds())}, {jax.device_count()} device(s) {dict(mesh.shape)}, "
                f"peak {peak / 1e9:.1f} GFLOP/s per device ({peak_source})"
            )
        bar = cleanup.enter_context(
            tqdm(total=args.steps, initial=start, desc="train", disable=not lead, dynamic_ncols=True)
        )
        pending = PendingMetrics()
        step = start
        batch = _device_batch(next(stream), mesh) if step < args.steps else None
        window_start = time.perf_counter()
        while step < args.steps:
            state, metrics = train_step(state, batch, jnp.int32(step))  # dispatched; runs while the host goes on
            step += 1
            pending.add(step, metrics)
            bar.update(1)
            data_position = stream.state()  # after this step's batch: what a checkpoint of `step` records
            if step < args.steps:
                batch = _device_batch(next(stream), mesh)  # packed and placed while the step runs
            stopping = stop.received  # read once: a signal between two reads must not skip the save
            evaluate_now = step % args.eval_every == 0 or step == args.steps
            save_now = step % args.checkpoint_every == 0 or step == args.steps or stopping
            if not (step % args.log_every == 0 or evaluate_now or save_now):
                continue
            records = pending.read()  # waits for the steps of the window
            seconds_per_step = (time.perf_counter() - window_start) / len(records)
            _log_steps(records, seconds_per_step, rates, log, bar, mgr, run_dir)
            if evaluate_now:
                val = _evaluate(evaluate, state, val_batches, mesh)
                log.log(step, {"loss": val, "perplexity": math.exp(min(val, MAX_LOG_LOSS))}, split="validation")
                if lead:
                    tqdm.write(f"step {step}: validation loss {val:.4f}")
            if save_now:
                checkpointing.save(mgr, step, state, data_position)
            if stopping:
                checkpointing.finish_saves(mgr)
                raise Stopped(stopping, step, run_dir / "checkpoints")
            window_start = time.perf_counter()  # evaluation and saving are not train throughput
        bar.close()
        if lead:
            plot_loss(run_dir)
        sample = _write_sample(run_dir, graphdef, state, tokenizer, args, lead)
    if lead:
        print(f"\n--- sample ---\n{sample}\n--------------")
        print(f"wrote {run_dir}/: config.json, metrics.jsonl, tensorboard/, checkpoints/, loss.png, sample.txt")
    return run_dir


def _log_steps(records: list[tuple[int, dict[str, float]]], seconds_per_step: float, rates: dict, log: MetricsLog,
               bar: tqdm, mgr, run_dir: Path) -> None:
    """Logs a window of read-back train metrics, each step with the window's mean step time;
    raises NonFiniteLoss at the first non-finite loss, after logging the finite steps before it."""
    bad = first_non_finite(records)
    logged = None
    for step, values in records[:bad]:
        logged = with_rates(values, seconds_per_step=seconds_per_step, **rates)
        log.log(step, logged)
    if logged is not None:
        bar.set_postfix(loss=f"{logged['loss']:.3f}", tok_s=f"{logged['tokens_per_second']:.0f}",
                        mfu=f"{logged['mfu']:.1%}")
    if bad is not None:
        step, values = records[bad]
        last = mgr.latest_step()
        saved = "No checkpoint was written" if last is None else f"The last good checkpoint is step {last}"
        raise NonFiniteLoss(
            f"non-finite loss {values['loss']} at step {step}; stopping. {saved} in {run_dir / 'checkpoints'}"
        )


def _jsonable(args: TrainArgs) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))
