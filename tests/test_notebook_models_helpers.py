"""The helpers of the recall and open-models notebooks: experiments/recall_and_cache.py (the MQAR
grid through recall_mqar's own sweep, and the recall models' decode caches)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `experiments` is a package

from experiments import recall, recall_and_cache, recall_mqar  # noqa: E402

TINY = dict(seq_len=16, num_kv_pairs=2, vocab_size=16, tokens_per_step=64, lrs=(3e-3,), steps=2, eval_examples=8)


def test_jobs_follow_the_scripts_defaults():
    """batch = tokens / L, evaluations every fifth of the budget, halving at a quarter unless vmapped."""
    grid = recall_and_cache.jobs(["attention", "gdn_attention"], [32, 64], seq_len=64, num_kv_pairs=4, vocab_size=128,
                                 tokens_per_step=2048, lrs=[1e-3, 1e-2], steps=1000)
    assert [(j.d_model, j.mixer) for j in grid] == [(32, "attention"), (32, "gdn_attention"), (64, "attention"),
                                                     (64, "gdn_attention")]
    j = grid[0]
    assert (j.batch_size, j.eval_every, j.prune_at, j.stop_at, j.lrs, j.vmap) == (32, 200, 250, 0.99, (1e-3, 1e-2), False)
    vmapped = recall_and_cache.jobs(["mamba2"], [32], seq_len=64, num_kv_pairs=4, vocab_size=128, tokens_per_step=100,
                                    lrs=[1e-3], steps=10, vmap=True, stop_at=1.0)[0]
    assert (vmapped.batch_size, vmapped.eval_every, vmapped.prune_at, vmapped.stop_at) == (1, 2, None, None)


def test_jobs_refuse_bad_grids():
    args = dict(seq_len=64, num_kv_pairs=4, vocab_size=128, tokens_per_step=2048, lrs=[1e-3], steps=100)
    with pytest.raises(ValueError, match="mixers must be"):
        recall_and_cache.jobs(["rwkv"], [32], **args)
    with pytest.raises(ValueError, match="d_models"):
        recall_and_cache.jobs(["attention"], [], **args)
    with pytest.raises(ValueError, match="steps >= 2"):
        recall_and_cache.jobs(["attention"], [32], **(args | dict(steps=1)))
    with pytest.raises(ValueError):  # 40 pairs do not fit in 64 tokens
        recall_and_cache.jobs(["attention"], [32], **(args | dict(num_kv_pairs=40)))


def test_accuracy_sweep_is_the_harness_sweep_and_draws_its_figure(tmp_path):
    """The rows of each job, in the grid's order, with the accuracy train_sweep itself gives for the
    same job; the figure is recall_mqar's, and the caller's matplotlib backend survives it."""
    grid = recall_and_cache.jobs(["attention", "linear_attention"], [32], **TINY)
    rows = recall_and_cache.accuracy_sweep(grid)
    assert [(r["mixer"], r["d_model"], r["best"]) for r in rows] == [("attention", 32, 1), ("linear_attention", 32, 1)]
    assert recall_and_cache.best_rows(rows) == rows
    job = grid[0]
    direct = recall.train_sweep(recall.mqar_config("attention", d_model=32, vocab_size=16),
                                recall.Task(job.seq_len, job.num_kv_pairs, job.vocab_size), lrs=job.lrs,
                                steps=job.steps, batch_size=job.batch_size, eval_every=job.eval_every,
                                eval_examples=job.eval_examples, stop_at=job.stop_at, prune_at=job.prune_at,
                                log=None).best()
    assert rows[0]["accuracy"] == round(direct.accuracy, 4) and rows[0]["val_loss"] == round(direct.val_loss, 4)
    assert rows[0]["steps"] == 2 and rows[0]["batch_size"] == 4
    csv_path = recall_and_cache.write_csv(rows, tmp_path / "recall.csv")
    assert csv_path.read_text().splitlines()[0].split(",") == recall_mqar.FIELDS
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        png = recall_and_cache.plot_accuracy(rows, tmp_path / "recall.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cache_rows_grow_with_context_only_for_attention():
    """A KV slot per token per attention layer (keys, values and the slot's document number); the
    recurrent models' states do not depend on the context; the 1:1 hybrid holds one of each."""
    contexts = [256, 512, 2048]
    rows = recall_and_cache.cache_rows(["attention", "linear_attention", "gated_deltanet", "gdn_attention"], [64],
                                       vocab_size=32, contexts=contexts)
    attention = recall_and_cache.cache_at(rows, "attention", 64)
    heads = 64 // recall.HEAD_DIM
    per_slot = 2 * (2 * heads * recall.HEAD_DIM * 4 + 4)  # two layers: k and v in float32, and key_doc (int32)
    assert attention[512]["kv_bytes"] - attention[256]["kv_bytes"] == per_slot * 256
    assert attention[2048]["kv_bytes"] - attention[512]["kv_bytes"] == per_slot * 1536
    assert all(r["recurrent_bytes"] == 0 and r["state_elements"] == 0 for r in attention.values())
    linear = recall_and_cache.cache_at(rows, "linear_attention", 64)
    assert {r["total_bytes"] for r in linear.values()} == {4 * linear[256]["state_elements"]}  # no conv state
    gdn = recall_and_cache.cache_at(rows, "gated_deltanet", 64)
    assert len({r["total_bytes"] for r in gdn.values()}) == 1 and gdn[256]["kv_bytes"] == 0
    assert gdn[256]["recurrent_bytes"] > 4 * gdn[256]["state_elements"]  # the short convs' states besides
    hybrid = recall_and_cache.cache_at(rows, "gdn_attention", 64)
    for c in contexts:
        assert 2 * hybrid[c]["kv_bytes"] == attention[c]["kv_bytes"]
        assert 2 * hybrid[c]["recurrent_bytes"] == gdn[c]["recurrent_bytes"]
    with pytest.raises(ValueError, match="no cache rows"):
        recall_and_cache.cache_at(rows, "mamba2", 64)
    with pytest.raises(ValueError, match="contexts"):
        recall_and_cache.cache_rows(["attention"], [64], vocab_size=32, contexts=[0])


def test_plot_cache_draws_one_line_per_mixer_in_each_width():
    rows = recall_and_cache.cache_rows(["attention", "mamba2"], [32, 64], vocab_size=16, contexts=[128, 1024])
    fig = recall_and_cache.plot_cache(rows)
    assert len(fig.axes) == 2
    for ax, d_model in zip(fig.axes, (32, 64)):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"softmax attention", "Mamba-2"}
        np.testing.assert_array_equal(lines["softmax attention"].get_ydata(),
                                      [recall_and_cache.cache_at(rows, "attention", d_model)[c]["total_bytes"]
                                       for c in (128, 1024)])
    import matplotlib.pyplot as plt

    plt.close(fig)


# ----------------------------------------------------------------------------- experiments/open_models.py

from experiments import long_context, open_models  # noqa: E402
from jaxlm.models import preset  # noqa: E402
from jaxlm.models.active_params import param_counts  # noqa: E402


def test_model_rows_describe_the_presets_layouts_and_counts():
    rows = {r["name"]: r for r in open_models.model_rows("tiny", ["qwen3_next", "kimi_linear", "transformer"])}
    q = rows["qwen3_next"]
    assert q["layout"] == "3 Gated DeltaNet + 1 attention; MoE in 4 layers: 8 experts, top-2, 1 shared"
    assert (q["kv_layers"], q["mixer_layers"]) == (1, 4)
    assert q["active"] == param_counts(preset("qwen3_next", "tiny"))["active"] < q["total"]
    assert rows["kimi_linear"]["layout"].startswith("3 KDA + 1 MLA; MoE in 3 layers")
    t = rows["transformer"]
    assert (t["kv_layers"], t["active_fraction"]) == (4, 1.0)
    assert t["gflops_per_token"] > q["gflops_per_token"]  # four attention layers at 4K tokens against one
    with pytest.raises(ValueError, match="names must be"):
        open_models.model_rows("tiny", ["llama"])


def test_cache_sizes_split_kv_from_recurrent_with_mla_among_the_kv_caches():
    contexts = [128, 1024]
    for name in ("qwen3_next", "minimax", "transformer"):  # no MLA: the same split as long_context.cache_bytes
        config = preset(name, "tiny")
        sizes = open_models.cache_sizes(config, contexts)
        assert sizes == {c: long_context.cache_bytes(config, c) for c in contexts}
    kimi = preset("kimi_linear", "tiny")
    sizes = open_models.cache_sizes(kimi, contexts)
    assert sizes[128]["recurrent"] == sizes[1024]["recurrent"] > 0  # KDA's states
    # MLA keeps, per slot, the latent (kv_lora_rank) and the RoPE key (0 here: Kimi Linear's MLA has no
    # positions) in float32, and the slot's document number.
    per_slot = (kimi.mla_dims()["kv_lora_rank"] + kimi.mla_dims()["qk_rope_head_dim"]) * 4 + 4
    assert sizes[1024]["kv"] - sizes[128]["kv"] == per_slot * (1024 - 128)
    assert sizes[1024]["total"] == long_context.cache_bytes(kimi, 1024)["total"]


def test_cache_rows_and_plots():
    rows = open_models.cache_rows("tiny", [256, 4096], ["qwen3_next", "transformer"])
    q, t = open_models.by_context(rows, "qwen3_next"), open_models.by_context(rows, "transformer")
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    # bfloat16 K and V: the transformer's 4 layers of 2 KV heads of 32 against Qwen3-Next's one layer of 1.
    assert t[4096]["kv_bytes"] - t[256]["kv_bytes"] == 4 * (2 * 2 * 32 * 2 + 4) * (4096 - 256)
    assert q[4096]["kv_bytes"] - q[256]["kv_bytes"] == 1 * (2 * 1 * 32 * 2 + 4) * (4096 - 256)
    fig = open_models.plot_cache(rows)
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    np.testing.assert_array_equal(lines["Qwen3-Next"], [q[256]["total_bytes"], q[4096]["total_bytes"]])
    bars = open_models.plot_params(open_models.model_rows("tiny", ["qwen3_next", "transformer"]))
    assert len(bars.axes[0].patches) == 4
    import matplotlib.pyplot as plt

    plt.close("all")
    with pytest.raises(ValueError, match="contexts"):
        open_models.cache_sizes(preset("transformer", "tiny"), [])


def test_logits_against_transformers_and_greedy_text(tmp_path):
    """A jaxlm transformer saved as LlamaForCausalLM: transformers computes the same logits."""
    pytest.importorskip("transformers")
    from flax import nnx

    from jaxlm.data import load_tokenizer
    from jaxlm.interop import hf
    from jaxlm.models import LM

    model = LM(preset("transformer", "tiny", n_layers=2, d_ff=64), rngs=nnx.Rngs(0))
    hf.save(model, tmp_path)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 9))
    result = open_models.logits_against_transformers(hf.load(tmp_path), tmp_path, tokens)
    assert result["max_abs"] < 1e-4 and result["rel_rms"] < 1e-4 and result["top1_agreement"] == 1.0
    from jaxlm.generate import generate

    tokenizer = load_tokenizer("byte")
    expected = np.asarray(generate(model, np.asarray([tokenizer.encode("ab")], np.int32), 5)[0]).tolist()
    assert len(expected) == 2 + 5 and expected[:2] == list(tokenizer.encode("ab"))
    assert open_models.greedy_text(model, tokenizer, "ab", 5) == tokenizer.decode(expected)  # the prompt once
    with pytest.raises(ValueError, match="tokens must be"):
        open_models.logits_against_transformers(model, tmp_path, np.zeros(3, np.int32))
