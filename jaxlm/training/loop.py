"""The training loop, top to bottom: data, model, optimizer, restore, steps, evaluation,
checkpoints, and the closing sample. ``python -m jaxlm.train`` parses TrainArgs and calls ``train``."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxlm import data, sharding
from jaxlm.generate import generate
from jaxlm.models import LM, ModelConfig, count_params, preset
from jaxlm.models.flops import flops_per_token
from jaxlm.training import checkpointing, optimizer
from jaxlm.training.args import TrainArgs
from jaxlm.training.metrics import MetricsLog, plot_loss
from jaxlm.training.peak import peak_flops_per_second
from jaxlm.training.step import LossWeights, TrainState, init_state, jit_steps


class NonFiniteLoss(RuntimeError):
    pass


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


def _check_args(args: TrainArgs, mesh) -> None:
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "eval_every",
                 "eval_batches", "keep_checkpoints", "sample_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup < args.steps:
        raise ValueError(f"--warmup must be in [0, --steps={args.steps}), got {args.warmup}")
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
    record = checkpointing.read_run_config(Path(args.init_from))
    return ModelConfig().replace(**record["model"]), args.tokenizer or record["tokenizer"]


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


def _check_run_folder(run_dir: Path, config: ModelConfig, tokenizer_spec: str) -> None:
    """A resumed run must be the same model: refuse to mix checkpoints of two configs."""
    if not (run_dir / checkpointing.CONFIG_FILE).exists():
        return
    record = checkpointing.read_run_config(run_dir)
    if record["model"] != json.loads(config.to_json()) or record["tokenizer"] != tokenizer_spec:
        raise ValueError(
            f"{run_dir} holds a run of a different model or tokenizer; pass another --out, or the same "
            "arguments as that run to resume it"
        )


def _abstract_state(config: ModelConfig, args: TrainArgs, tx, mesh):
    """(the model as shapes only, its graphdef, the TrainState as shapes, the state's shardings):
    nothing is allocated until the state is restored or created."""
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(args.seed)))
    graphdef, abstract_state = init_state(abstract, tx)
    shardings = TrainState(*(sharding.state_shardings(part, mesh, config.d_model) for part in abstract_state))
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
    nll, count = 0.0, 0.0
    for batch in batches:
        n, c = evaluate(state, _device_batch(batch, mesh))
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
    """Runs (or resumes) the job of ``args``; returns the run folder."""
    mesh = sharding.make_mesh(args.mesh)
    _check_args(args, mesh)
    lead = jax.process_index() == 0
    run_dir = args.run_dir()
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
    _check_run_folder(run_dir, config, tokenizer.spec)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.write_run_config(run_dir, config, tokenizer.spec, _jsonable(args))

    schedule = optimizer.learning_rate_schedule(args.lr, args.warmup, args.steps, args.schedule)
    tx = optimizer.adamw(schedule, weight_decay=args.weight_decay, clip_norm=args.clip_norm)
    weights = LossWeights(args.load_balancing, args.router_z, args.selection_bias_rate)
    mgr = checkpointing.manager(run_dir, args.keep_checkpoints)
    peak, peak_source = peak_flops_per_second(dtype=args.dtype)  # outside the mesh: it probes one device
    log = MetricsLog(run_dir, enabled=lead)
    with jax.set_mesh(mesh), _StopSignal() as stop:
        abstract_model, graphdef, abstract_state, shardings = _abstract_state(config, args, tx, mesh)
        train_step, evaluate = jit_steps(
            graphdef, shardings, tx, schedule, weights, grad_accum=args.grad_accum,
            use_selection_bias=config.use_selection_bias, mesh=mesh,
        )
        rng = jax.random.key(args.seed)
        start = 0
        restored = checkpointing.restore_latest(mgr, checkpointing.abstract_like(abstract_state, shardings))
        if restored is None:
            state = _fresh_state(config, args, tx, shardings)
        else:
            state, meta, rng = restored
            start = meta["step"]
            stream.restore(meta["data"])
            if lead:
                tqdm.write(f"resumed {run_dir} at step {start}")

        n_params = count_params(abstract_model)
        tokens_per_step = args.batch_size * args.seq_len
        flops_step = flops_per_token(config, args.seq_len) * tokens_per_step
        peak_total = peak * jax.device_count()
        if lead:
            tqdm.write(
                f"{args.preset}-{args.size}: {n_params / 1e6:.1f}M parameters, {config.n_layers} layers "
                f"{''.join(m for m, _ in config.layer_kinds())}, {jax.device_count()} device(s) {dict(mesh.shape)}, "
                f"peak {peak / 1e9:.1f} GFLOP/s per device ({peak_source})"
            )
        bar = tqdm(total=args.steps, initial=start, desc="train", disable=not lead, dynamic_ncols=True)
        step, last = start, time.perf_counter()
        try:
            while step < args.steps:
                batch = _device_batch(next(stream), mesh)
                state, metrics = train_step(state, batch, jnp.int32(step))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step += 1
                now = time.perf_counter()
                elapsed, last = now - last, now
                if not math.isfinite(metrics["loss"]):
                    raise NonFiniteLoss(
                        f"non-finite loss {metrics['loss']} at step {step}; stopping. The last good checkpoint "
                        f"is step {mgr.latest_step()} in {run_dir / 'checkpoints'}"
                    )
                metrics.update(
                    perplexity=math.exp(min(metrics["loss"], 50.0)), tokens_per_second=tokens_per_step / elapsed,
                    mfu=flops_step / elapsed / peak_total,
                )
                log.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:.0f}",
                                mfu=f"{metrics['mfu']:.1%}")
                bar.update(1)
                if step % args.eval_every == 0 or step == args.steps:
                    val = _evaluate(evaluate, state, val_batches, mesh)
                    log.log(step, {"loss": val, "perplexity": math.exp(min(val, 50.0))}, split="validation")
                    if lead:
                        tqdm.write(f"step {step}: validation loss {val:.4f}")
                    last = time.perf_counter()
                if step % args.checkpoint_every == 0 or step == args.steps or stop.received:
                    checkpointing.save(mgr, step, state, stream.state(), rng)
                if stop.received:
                    mgr.wait_until_finished()
                    tqdm.write(f"{stop.received}: saved step {step} to {run_dir / 'checkpoints'}; rerun to resume")
                    return run_dir
        except NonFiniteLoss as err:
            mgr.wait_until_finished()
            bar.close()
            log.close()
            sys.exit(str(err))
        bar.close()
        mgr.wait_until_finished()
        log.close()
        if lead:
            plot_loss(run_dir)
        sample = _write_sample(run_dir, graphdef, state, tokenizer, args, lead)
    if lead:
        print(f"\n--- sample ---\n{sample}\n--------------")
        print(f"wrote {run_dir}/: config.json, metrics.jsonl, tensorboard/, checkpoints/, loss.png, sample.txt")
    return run_dir


def _jsonable(args: TrainArgs) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))
