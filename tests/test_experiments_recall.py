"""The recall harness (experiments/recall.py) against the trainer's own step and a numpy count,
and the --quick modes of experiments/recall_mqar.py and experiments/hybrid_ratio.py end to end
(they check the pipeline, not the science)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `experiments` is a package

from experiments import hybrid_ratio, recall, recall_mqar  # noqa: E402
from jaxlm.data import MQARBatches  # noqa: E402
from jaxlm.models import LM, count_params, preset  # noqa: E402
from jaxlm.training import optimizer  # noqa: E402
from jaxlm.training.step import LossWeights, init_state, make_train_step  # noqa: E402
from numerics import F32_GRAD, F32_OUT, assert_close  # noqa: E402

TASK = recall.Task(seq_len=16, num_kv_pairs=2, vocab_size=16)
CONFIG = recall.mqar_config("linear_attention", d_model=32, vocab_size=16)


def _batch(step: int = 0, batch_size: int = 4) -> dict:
    source = MQARBatches(TASK.mqar, seq_len=TASK.seq_len, batch_size=batch_size, seed=0)
    source.restore({"step": step})
    return recall._batch_dict(next(source))


def test_mqar_config_shapes_every_mixer():
    """Heads of width HEAD_DIM, no feed-forward, the hybrid patterns as named."""
    patterns = {m: recall.mqar_config(m, d_model=64, vocab_size=32).layer_pattern for m in recall.MIXERS}
    assert patterns == {"attention": "A", "linear_attention": "N", "mamba2": "M", "gla": "V", "deltanet": "R",
                        "gated_deltanet": "G", "gdn_attention": "GA", "gdn_swa": "GW"}
    c = recall.mqar_config("gdn_swa", d_model=64, vocab_size=32)
    assert (c.n_layers, c.ffn_pattern, c.n_heads, c.resolved_head_dim, c.window) == (2, "-", 2, 32, recall.SWA_WINDOW)
    assert c.linear_head_dims("G") == (32, 32)
    # Gated DeltaNet and Mamba-2 hold the same state per layer: 32·d_model elements.
    assert recall.recurrent_state_elements(recall.mqar_config("gated_deltanet", d_model=64, vocab_size=32)) == 2 * 32 * 64
    assert recall.recurrent_state_elements(recall.mqar_config("mamba2", d_model=64, vocab_size=32)) == 2 * 32 * 64
    assert recall.recurrent_state_elements(recall.mqar_config("attention", d_model=64, vocab_size=32)) == 0
    with pytest.raises(ValueError, match="mixer must be one of"):
        recall.mqar_config("rwkv", d_model=64, vocab_size=32)
    with pytest.raises(ValueError, match="multiple of 32"):
        recall.mqar_config("attention", d_model=48, vocab_size=32)


def test_traced_rate_step_equals_the_trainers_step():
    """The sweep's step (AdamW and schedule built from a traced rate) gives the parameters of the
    trainer's step with the same rate built as a Python float."""
    lr, steps, warmup = 3e-3, 10, 2
    graphdef, state = init_state(LM(CONFIG, rngs=nnx.Rngs(0)), optimizer.adamw(
        optimizer.learning_rate_schedule(lr, warmup, steps)))
    schedule = optimizer.learning_rate_schedule(lr, warmup, steps)
    reference = jax.jit(make_train_step(graphdef, optimizer.adamw(schedule), schedule, LossWeights(), 1, False))
    swept = jax.jit(recall.make_train_step_lr(graphdef, steps=steps, warmup=warmup, weight_decay=0.1))
    ref_state = sweep_state = state
    for step in range(3):
        batch = _batch(step)
        ref_state, ref_metrics = reference(ref_state, batch, jnp.int32(step))
        sweep_state, metrics = swept(sweep_state, jnp.float32(lr), batch, jnp.int32(step))
    assert_close(sweep_state.params, ref_state.params, F32_OUT, "params after 3 steps")
    assert_close(metrics["loss"], ref_metrics["loss"], F32_OUT, "loss")
    assert float(metrics["lr"]) == pytest.approx(float(schedule(2)), rel=1e-6)


def test_accuracy_counts_argmax_hits_at_the_answers():
    model = LM(CONFIG, rngs=nnx.Rngs(1))
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    batch = _batch(0, batch_size=8)
    hits, answers, nll = recall.make_accuracy(graphdef)(params, others, batch)
    logits = np.asarray(model(jnp.asarray(batch["tokens"]), segment_ids=jnp.asarray(batch["segment_ids"])).logits,
                        np.float64)
    mask = batch["loss_mask"] > 0
    assert int(answers) == mask.sum() == 8 * TASK.num_kv_pairs
    assert int(hits) == int(np.sum((logits.argmax(-1) == batch["targets"])[mask]))
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    picked = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    assert_close(nll, np.sum((log_z - picked)[mask]), F32_OUT, "answers' nll")


def test_vmapped_sweep_equals_one_after_another():
    """The same rates, batches and initial parameters: vmapped or not, the same runs."""
    kw = dict(lrs=(0.0, 3e-3, 3e-2), steps=4, batch_size=4, eval_every=2, eval_examples=8, log=None)
    vmapped = recall.train_sweep(CONFIG, TASK, vmap=True, **kw)
    serial = recall.train_sweep(CONFIG, TASK, vmap=False, **kw)
    assert [r.lr for r in vmapped.runs] == [r.lr for r in serial.runs] == list(kw["lrs"])
    for v, s in zip(vmapped.runs, serial.runs):
        assert (v.steps, [h[0] for h in v.history]) == (s.steps, [h[0] for h in s.history]) == (4, [2, 4])
        assert_close(v.loss, s.loss, F32_GRAD, f"final loss at lr {v.lr}")
        assert_close(v.val_loss, s.val_loss, F32_GRAD, f"validation loss at lr {v.lr}")
        assert v.accuracy == pytest.approx(s.accuracy, abs=1 / 16)  # at most one of 16 answers flips on a tie
    # lr 0 never moves the parameters: its accuracy is the untrained model's.
    graphdef, params, others = nnx.split(LM(CONFIG, rngs=nnx.Rngs(0)), nnx.Param, ...)
    accuracy = jax.jit(recall.make_accuracy(graphdef))
    counts = [accuracy(params, others, b) for b in recall.evaluation_batches(TASK, examples=8, batch_size=8)]
    untrained = sum(int(c[0]) for c in counts) / sum(int(c[1]) for c in counts)
    assert serial.runs[0].accuracy == vmapped.runs[0].accuracy == untrained
    assert vmapped.best() is max(vmapped.runs, key=lambda r: r.accuracy)


def test_pruned_sweep_continues_the_rate_of_lowest_validation_loss():
    """Successive halving: every rate runs to the prune step, the one of lowest validation loss
    there runs on, and its run is the unpruned one (the same schedule, batches and evaluations)."""
    kw = dict(lrs=(1e-3, 3e-3, 3e-2), steps=4, batch_size=4, eval_every=2, eval_examples=8, log=None)
    full = recall.train_sweep(CONFIG, TASK, **kw)
    pruned = recall.train_sweep(CONFIG, TASK, prune_at=2, **kw)
    at_prune = [run.history[0] for run in full.runs]  # (2, accuracy, validation loss)
    survivor = int(np.argmin([v for _, _, v in at_prune]))
    assert [r.pruned for r in pruned.runs] == [i != survivor for i in range(3)]
    assert pruned.best() is pruned.runs[survivor]
    for i, (p_run, f_run) in enumerate(zip(pruned.runs, full.runs)):
        if i == survivor:
            assert p_run.steps == 4
            assert_close(np.array(p_run.history), np.array(f_run.history), F32_OUT, "survivor's evaluations")
            assert_close(p_run.loss, f_run.loss, F32_OUT, "survivor's final loss")
        else:
            assert p_run.steps == 2
            assert_close(np.array(p_run.history), np.array(f_run.history[:1]), F32_OUT, "pruned run's evaluation")
    with pytest.raises(ValueError, match="prune_at"):
        recall.train_sweep(CONFIG, TASK, prune_at=4, **kw)
    with pytest.raises(ValueError, match="prune_at"):
        recall.train_sweep(CONFIG, TASK, prune_at=2, vmap=True, **kw)


def test_sweep_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        recall.train_sweep(CONFIG, recall.Task(16, 2, vocab_size=32), lrs=(1e-3,), steps=4, batch_size=2, log=None)
    with pytest.raises(ValueError, match="steps >= 2"):
        recall.train_sweep(CONFIG, TASK, lrs=(1e-3,), steps=1, batch_size=2, log=None)
    with pytest.raises(ValueError, match="seq_len must be at least"):
        recall.train_sweep(CONFIG, recall.Task(4, 2, vocab_size=16), lrs=(1e-3,), steps=4, batch_size=2, log=None)


def _read(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_recall_mqar_quick_end_to_end(tmp_path):
    out = tmp_path / "recall_mqar.csv"
    recall_mqar.main(["--quick", "--out", str(out)])
    rows = _read(out)
    quick = recall_mqar.QUICK
    assert len(rows) == len(quick["mixers"]) * len(recall_mqar.LRS)
    assert {r["mixer"] for r in rows} == set(quick["mixers"])
    for mixer in quick["mixers"]:
        group = [r for r in rows if r["mixer"] == mixer]
        assert [float(r["lr"]) for r in group] == recall_mqar.LRS
        best = [r for r in group if r["best"] == "1"]
        assert len(best) == 1 and float(best[0]["accuracy"]) == max(float(r["accuracy"]) for r in group)
        # Successive halving: the best is the one rate that ran the whole budget.
        assert [int(r["steps"]) for r in group if r["pruned"] == "0"] == [quick["steps"]]
        assert best[0]["pruned"] == "0"
    for r in rows:
        steps = quick["steps"] if r["pruned"] == "0" else quick["prune_at"]
        assert int(r["steps"]) == steps and int(r["budget"]) == quick["steps"]
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and np.isfinite(float(r["final_loss"]))
        assert int(r["batch_size"]) == quick["tokens_per_step"] // int(r["seq_len"])
        assert int(r["n_params"]) > 0
        last_step, accuracy, val_loss = r["history"].split()[-1].split(":")
        assert (int(last_step), float(accuracy), float(val_loss)) == (steps, float(r["accuracy"]), float(r["val_loss"]))
    assert (tmp_path / "recall_mqar.png").stat().st_size > 10_000


def test_hybrid_models_have_equal_parameter_counts():
    """Each model's solved d_ff lands within PARAM_TOLERANCE of pure Gated DeltaNet's count, at
    the full run's sizes; the patterns are the named ratios."""
    names = list(hybrid_ratio.MODELS)
    d_ff = hybrid_ratio.equal_param_d_ff(names, {})
    counts = {n: count_params(preset(*hybrid_ratio.BASE, **hybrid_ratio.model_overrides(n, {}), d_ff=d_ff[n]))
              for n in names}
    target = counts["gdn"]
    assert all(abs(c - target) <= hybrid_ratio.PARAM_TOLERANCE * target for c in counts.values()), counts
    config = preset(*hybrid_ratio.BASE, **hybrid_ratio.model_overrides("gdn_attn_7to1", {}), d_ff=d_ff["gdn_attn_7to1"])
    assert "".join(m for m, _ in config.layer_kinds()) == "GGGGGGGA"
    assert [m for m, _ in preset(*hybrid_ratio.BASE, **hybrid_ratio.model_overrides("gdn_attn_3to1", {})).layer_kinds()
            ].count("A") == 2


def test_hybrid_ratio_quick_end_to_end(tmp_path):
    out = tmp_path / "hybrid_ratio.csv"
    hybrid_ratio.main(["--quick", "--out", str(out), "--runs-dir", str(tmp_path / "runs")])
    rows = _read(out)
    assert [r["model"] for r in rows] == hybrid_ratio.QUICK["models"]
    r = rows[0]
    quick = hybrid_ratio.QUICK
    assert int(r["train_tokens"]) == quick["steps"] * quick["batch_size"] * quick["seq_len"]
    assert 0 < float(r["val_loss_nats_per_byte"]) < 10 and 0.0 <= float(r["mqar_accuracy"]) <= 1.0
    assert float(r["train_tokens_per_s"]) > 0 and float(r["decode_step_ms_4k"]) > 0
    # One attention layer of the 2-layer 1:1 hybrid: its KV cache grows with the context, the
    # Gated DeltaNet state does not. Slots are context + 1 (bench_decode's synthetic cache).
    small, large = quick["decode_contexts"]
    config = preset(*hybrid_ratio.BASE, **hybrid_ratio.model_overrides(r["model"], hybrid_ratio.QUICK_OVERRIDES),
                    d_ff=int(r["d_ff"]))
    heads, head_dim = config.resolved_n_kv_heads, config.resolved_head_dim
    per_slot = 2 * heads * head_dim * 4 + 4  # k and v in float32, and the slot's document id
    assert int(r["decode_cache_bytes_32k"]) - int(r["decode_cache_bytes_4k"]) == (large - small) * per_slot
    assert (tmp_path / "hybrid_ratio.png").stat().st_size > 10_000
