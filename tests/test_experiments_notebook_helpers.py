"""experiments/forms.py and experiments/gate_states.py, the helpers colab/01_linear_attention.ipynb
calls: their numbers against direct computations, and their errors."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `experiments` is a package

from experiments import forms, gate_states  # noqa: E402
from jaxlm import ops  # noqa: E402
from numerics import F32_OUT  # noqa: E402


def test_relative_rms_is_the_contracts_measure():
    b = np.array([3.0, -4.0])
    a = b + np.array([0.3, 0.4])
    assert forms.relative_rms(a, b) == pytest.approx(np.sqrt(0.125) / (np.sqrt(12.5) + 1e-8))
    assert forms.relative_rms(b, b) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        forms.relative_rms(np.zeros(2), np.zeros(3))


@pytest.mark.parametrize("op", list(forms.NAMED_OPS))
def test_agreement_of_the_forms_is_within_the_contract(op):
    errors = forms.agreement(op, 80)
    assert set(errors) == {"associative", "chunk"}
    for err in errors.values():
        assert set(err) == {"o_max_abs", "o_rel_rms", "state_rel_rms"}
        assert err["o_rel_rms"] <= F32_OUT and err["state_rel_rms"] <= F32_OUT and err["o_max_abs"] < 1e-4


def test_agreement_is_zero_against_itself_and_the_measure_tells_two_ops_apart():
    """The recurrent form against itself is exact; linear attention (no gate) is far from simple_gla."""
    assert forms.agreement("simple_gla", 40, forms=("recurrent",))["recurrent"]["o_rel_rms"] == 0.0
    x = forms.bench_ops.make_inputs(40)
    gated = ops.simple_gla(x["q"], x["k"], x["v"], x["g"], impl="recurrent")[0]
    plain = ops.linear_attn(x["q"], x["k"], x["v"], impl="recurrent")[0]
    assert forms.relative_rms(plain, gated) > 0.1


def test_agreement_refuses_unknown_ops_and_lengths():
    with pytest.raises(ValueError, match="op must be one of"):
        forms.agreement("attention", 16)
    with pytest.raises(ValueError, match="positive ints"):
        forms.agreement("gla", 0)


def test_time_against_length_measures_each_curve_at_each_length():
    rows = forms.time_against_length([16, 32], repeats=1)
    assert [(r["curve"], r["T"]) for r in rows] == [(c, t) for c in forms.TIMED for t in (16, 32)]
    assert all(0 < r["seconds"] < 60 for r in rows)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        forms.time_against_length([16], repeats=0)
    with pytest.raises(ValueError, match="seq_lens"):
        forms.time_against_length([])


def test_exponents_fit_the_power_law_and_the_plot_draws_each_curve():
    rows = [dict(curve=c, T=t, seconds=1e-9 * t**p) for c, p in (("quadratic", 2), ("linear", 1)) for t in (256, 512, 2048)]
    slopes = forms.exponents(rows)
    assert slopes["quadratic"] == pytest.approx(2.0) and slopes["linear"] == pytest.approx(1.0)
    fig = forms.plot_times(rows)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["quadratic: slope 2.00", "linear: slope 1.00"]


def test_gate_inputs_are_valid_gates():
    x = gate_states.inputs(20, k=8, v=4)
    assert x["q"].shape == x["k"].shape == (1, 20, 1, 8) and x["v"].shape == (1, 20, 1, 4)
    np.testing.assert_allclose(np.linalg.norm(x["k"], axis=-1), 1.0, rtol=1e-6)
    assert float(x["g"][0, 10, 0]) == gate_states.RESET_LOG_DECAY and float(jnp.max(x["g"])) < 0
    np.testing.assert_allclose(-1 / np.asarray(x["gk"][0, 0, 0, [0, -1]]), [500.0, 1.5], rtol=1e-5)
    assert np.all(np.diff(np.asarray(x["gk"][0, 0, 0])) < 0)  # slowest first
    with pytest.raises(ValueError, match="ints >= 2"):
        gate_states.inputs(1)


@pytest.mark.parametrize("op", list(gate_states.OPS))
def test_the_last_step_state_is_the_ops_final_state(op):
    x = gate_states.inputs(24, k=8, v=8)
    history = np.asarray(gate_states.states(op, x))
    assert history.shape == (24, 8, 8)
    args = {"linear_attn": (), "simple_gla": (x["g"],), "gla": (x["gk"],), "gated_delta_rule": (x["g"], x["beta"])}[op]
    _, final = getattr(ops, op)(x["q"], x["k"], x["v"], *args, impl="chunk", chunk_size=8, output_final_state=True)
    np.testing.assert_allclose(history[-1], np.asarray(final[0, 0]), rtol=1e-5, atol=1e-5)
    norms = gate_states.state_row_norms(op, x)
    np.testing.assert_allclose(norms, np.linalg.norm(history, axis=-1), rtol=1e-6)


def test_linear_attention_accumulates_and_the_scalar_gate_resets():
    x = gate_states.inputs(16, k=4, v=4)
    writes = np.einsum("tk,tv->tkv", np.asarray(x["k"][0, :, 0]), np.asarray(x["v"][0, :, 0]))
    np.testing.assert_allclose(np.asarray(gate_states.states("linear_attn", x)), np.cumsum(writes, axis=0), atol=1e-5)
    mamba = np.asarray(gate_states.states("simple_gla", x))
    np.testing.assert_allclose(mamba[8], writes[8], atol=1e-6)  # the reset step keeps only its own write
    np.testing.assert_allclose(mamba[9], 0.95 * writes[8] + writes[9], rtol=1e-5, atol=1e-6)


def test_gate_states_refuse_unknown_ops_and_plot_one_map_per_op():
    x = gate_states.inputs(8, k=4, v=4)
    with pytest.raises(ValueError, match="op must be one of"):
        gate_states.states("kda", x)
    norms = {op: gate_states.state_row_norms(op, x) for op in ("linear_attn", "gla")}
    fig = gate_states.plot(norms)
    maps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in maps] == [gate_states.OPS["linear_attn"], gate_states.OPS["gla"]]
    np.testing.assert_allclose(maps[1].images[0].get_array(), norms["gla"].T)
    with pytest.raises(ValueError, match="norms must map ops"):
        gate_states.plot({"kda": norms["gla"]})
