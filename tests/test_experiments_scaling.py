"""experiments/moe_scaling.py, long_context.py and attention_memory.py: their --quick modes end to end
(the pipeline, not the science), and the numbers their helpers compute against hand counts."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `experiments` is a package

from experiments import attention_memory, long_context, moe_scaling  # noqa: E402
from jaxlm.models import count_params, preset  # noqa: E402
from jaxlm.ops import KVCache  # noqa: E402
from numerics import F32_GRAD, F32_OUT  # noqa: E402

GIB = 1024**3


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- moe_scaling


def test_expert_width_matches_the_dense_feed_forward_flops():
    """Forward FLOPs of a SwiGLU layer: 2·3·D·F; of the MoE: 2·(D·E + k·3·D·F_e). Equal for
    F_e = (3F − E) / (3k), rounded."""
    dense = moe_scaling.dense_config()
    for e in (4, 8, 16, 32):
        expected = round((3 * dense.d_ff - e) / (3 * 2))
        assert moe_scaling.match_active_flops(dense, e, 2, 256) == expected


def test_active_params_count_only_the_chosen_experts():
    dense = moe_scaling.dense_config()
    run = moe_scaling.model_configs([8], [], 256, 1e-3)[1]
    d, f, w, layers = dense.d_model, dense.d_ff, run.config.resolved_d_expert, dense.n_layers
    # The dense model with each SwiGLU (3·D·F) replaced by a router (D·E) and two experts (2·3·D·F_e).
    expected = count_params(dense) + layers * (d * 8 + 2 * 3 * d * w - 3 * d * f)
    assert moe_scaling.active_params(run.config) == expected
    assert count_params(run.config) == expected + layers * 6 * 3 * d * w


def test_moe_scaling_quick(tmp_path):
    out = tmp_path / "moe"
    moe_scaling.main(["--quick", "--out", str(out)])
    rows = moe_scaling.read_rows(out.with_suffix(".csv"))
    assert out.with_suffix(".png").stat().st_size > 0
    finals = {r["run"]: r for r in moe_scaling.final_rows(rows)}
    assert set(finals) == {"dense", "E4-loss", "E4-bias"}
    assert all(math.isfinite(r["val_loss"]) and r["step"] == 6 for r in finals.values())
    # The expert load is every validation token's top-2 choices, in each of the 4 MoE layers: 1 batch of 2 × 64.
    for name in ("E4-loss", "E4-bias"):
        counts = finals[name]["expert_counts"]
        assert counts.shape == (4, 4)
        np.testing.assert_array_equal(counts.sum(-1), [2 * 64 * 2] * 4)


def test_load_summary_against_hand_counts():
    s = moe_scaling.load_summary(np.array([[4, 2, 2, 0], [2, 2, 2, 2]]))
    assert s["max_over_mean"] == pytest.approx((2.0 + 1.0) / 2)
    assert s["cv"] == pytest.approx((math.sqrt(2) / 2 + 0.0) / 2)
    assert s["idle"] == 1


# ----------------------------------------------------------------------------- long_context


def test_cache_bytes_against_hand_counts():
    """qwen3_next tiny: 3 Gated DeltaNet layers, each a float32 state [HV=4, K=32, V=32] and a conv
    state [W-1=3, 2·H·K + HV·V = 256]; 1 attention layer of 1 KV head of 32: k and v, float32, and
    an int32 document number per slot, plus per-row doc, pos and last_bad."""
    config = preset("qwen3_next", "tiny")
    recurrent = 3 * 4 * (4 * 32 * 32 + 3 * 256)
    for max_len in (1, 1000):
        got = long_context.cache_bytes(config, max_len)
        assert got["recurrent"] == recurrent
        assert got["kv"] == max_len * (2 * 32 * 4 + 4) + 4 + 4 + 4
        assert got["total"] == got["kv"] + got["recurrent"]


def test_cache_bytes_counts_mla_latents_with_the_attention_caches():
    """kimi_linear tiny (KKKC): the latent cache of its MLA layer grows with the context and is
    counted as attention cache; the three KDA layers' states do not grow."""
    config = preset("kimi_linear", "tiny")
    short, long = (long_context.cache_bytes(config, n) for n in (1, 1001))
    assert short["recurrent"] == long["recurrent"] > 0
    assert long["kv"] > short["kv"] > 0
    assert (long["kv"] - short["kv"]) % 1000 == 0  # the same bytes for every slot


def test_synthetic_cache_marks_the_written_slots():
    model_cache = (KVCache.empty(1, 1, 8, 4, 4, jnp.float32), KVCache.empty(1, 1, 3, 4, 4, jnp.float32), None)
    full, ring, none = long_context.synthetic_cache(model_cache, pos=5)
    np.testing.assert_array_equal(full.key_doc, [[0, 0, 0, 0, 0, -1, -1, -1]])
    np.testing.assert_array_equal(ring.key_doc, [[0, 0, 0]])  # a window ring that has wrapped is all written
    assert int(full.pos) == int(ring.pos) == 5 and none is None


def test_estimate_seconds():
    assert long_context.estimate_seconds([], 10, True) is None
    assert long_context.estimate_seconds([(100, 2.0)], 400, True) == pytest.approx(8.0)
    assert long_context.estimate_seconds([(100, 2.0)], 400, False) == pytest.approx(2.0)
    assert long_context.estimate_seconds([(100, 2.0), (200, 3.0)], 400, True) == pytest.approx(5.0)
    assert long_context.estimate_seconds([(100, 2.0), (200, 1.5)], 400, True) == pytest.approx(1.5)


def test_long_context_quick(tmp_path):
    out = tmp_path / "long"
    long_context.main(["--quick", "--out", str(out)])
    rows = long_context.read_rows(out.with_suffix(".csv"))
    assert out.with_suffix(".png").stat().st_size > 0
    assert [(r["context"], r["mode"], r["status"]) for r in rows] == [(512, "full", "ok"), (1024, "sampled", "ok")]
    assert [r["pieces_run"] for r in rows] == [2, 2]
    for r in rows:
        assert r["s_per_token"] > 0 and r["decode_step_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["kv_cache_bytes"] == long_context.cache_bytes(preset("transformer", "tiny"), r["context"] + 2)["kv"]


def test_out_of_memory_is_a_result():
    """The transformer's KV cache at 16M tokens is 32 GiB: its child fails to allocate under a 3 GiB limit."""
    got = long_context.run_in_child("transformer", "tiny", 2**24, 512, "sampled", 2, 3 * GIB, timeout=300)
    assert got["status"] == "out of memory", got
    assert 0 < got["peak_rss_bytes"] < 3 * GIB


# ----------------------------------------------------------------------------- attention_memory


def test_attention_forms_agree_with_the_materialised_one():
    for form, (err_o, err_g) in attention_memory.check_agreement(200).items():
        assert err_o <= F32_OUT and err_g <= F32_GRAD, form


def test_compiled_memory_grows_as_t_squared_only_when_materialised():
    """Doubling T: the materialised form's temporaries grow 4x and hold at least the [H, T, T]
    float32 scores; the query-blocked form's (past one block of 512 rows) about 2x, under half of them."""
    m1, m2 = (attention_memory.compiled_memory("materialised", t)["temp"] for t in (512, 1024))
    assert m1 >= attention_memory.H * 512 * 512 * 4 and 3.5 <= m2 / m1 <= 4.5
    x1, x2 = (attention_memory.compiled_memory("xla", t)["temp"] for t in (2048, 4096))
    assert 1.7 <= x2 / x1 <= 2.3 and x2 < attention_memory.H * 4096 * 4096 * 4 / 2


def test_attention_memory_quick(tmp_path):
    out = tmp_path / "att"
    attention_memory.main(["--quick", "--out", str(out)])
    rows = attention_memory.read_rows(out.with_suffix(".csv"))
    assert out.with_suffix(".png").stat().st_size > 0
    assert len(rows) == 2 * len(attention_memory.FORMS) * len(attention_memory.PASSES)
    assert all(r["status"] == "ran in-process" and r["seconds"] > 0 and r["compiled_bytes"] > 0 for r in rows)


def test_measure_in_child():
    got = attention_memory.measure_in_child("xla", 256, True, 1, address_limit=8 * GIB)
    assert got["status"] == "ran" and got["seconds"] > 0 and got["measured_bytes"] >= 0
