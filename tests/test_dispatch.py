"""ops.dispatch: the per-platform default lists (with the backend faked), the fallback from a form
that cannot take the inputs, explicit names that never fall back, and every registered form of
every op against its reference."""

from __future__ import annotations

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxlm import ops
from jaxlm.ops import dispatch
from jaxlm.ops.attention import ATTENTION_FORMS
from jaxlm.ops.moe.experts import GROUPED_EXPERT_FORMS
from kernels_pallas.call_layout import pallas_call_names
from numerics import F32_OUT, assert_close
from op_cases import FORM_TABLES, RECURRENCES, every_form, make_inputs

RECURRENCE_TABLES = tuple({id(r.table): r.table for r in RECURRENCES.values()}.values())


def recurrence_inputs(t=20, dk=8, dv=8) -> dict[str, np.ndarray]:
    return make_inputs((2, t, 1, 2, dk, dv))


@pytest.fixture
def fake_platform(monkeypatch):
    def fake(name: str) -> None:
        monkeypatch.setattr(dispatch, "platform", lambda: name)

    return fake


def pallas_calls(fn, *args) -> int:
    return len(pallas_call_names(jax.make_jaxpr(fn)(*args)))


@pytest.mark.parametrize("table", FORM_TABLES, ids=lambda t: t.op)
def test_every_table_has_a_default_list_for_every_platform(table, fake_platform):
    for name in dispatch.PLATFORMS:
        fake_platform(name)
        order = table.candidates(None)
        assert order == table.defaults[name] and order and all(f in table.forms for f in order)


def test_default_lists_by_platform(fake_platform):
    expected = {
        "cpu": {"recurrence": ("chunk",), "attention": ("xla",), "experts": ("tiled",)},
        "gpu": {"recurrence": ("pallas", "chunk"), "attention": ("pallas", "xla"), "experts": ("ragged_dot",)},
        "tpu": {"recurrence": ("pallas", "chunk"), "attention": ("pallas", "xla"), "experts": ("ragged_dot",)},
    }
    for name, want in expected.items():
        fake_platform(name)
        for table in RECURRENCE_TABLES:
            assert table.candidates(None) == want["recurrence"], (name, table.op)
        assert ATTENTION_FORMS.candidates(None) == want["attention"]
        assert GROUPED_EXPERT_FORMS.candidates(None) == want["experts"]


def test_an_unknown_backend_gets_the_cpu_defaults(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "metal")
    assert dispatch.platform() == "cpu"


def test_faked_gpu_runs_the_kernel_and_cpu_the_chunk_form(fake_platform):
    """impl=None follows the platform: on a (faked) GPU the Pallas kernel is traced, here in
    interpret mode, and gives the recurrent result; on the CPU no kernel is traced."""
    x = recurrence_inputs()
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])

    def run(*args):  # a new function each time: jax caches traces by function
        return ops.gated_delta_rule(*args)[0]

    fake_platform("cpu")
    assert pallas_calls(run, *args) == 0
    fake_platform("gpu")
    assert pallas_calls(lambda *a: run(*a), *args) == 1
    o_ref, _ = ops.gated_delta_rule(*args, impl="recurrent")
    assert_close(run(*args), o_ref, F32_OUT, "gpu default")


def test_a_form_that_cannot_take_the_shapes_falls_back(fake_platform):
    """K = 300 is past the kernels' widest head: on a GPU the default list goes on to "chunk"."""
    x = recurrence_inputs(t=6, dk=300, dv=4)
    args = (x["q"], x["k"], x["v"], x["g"])
    fake_platform("gpu")
    run = lambda q, k, v, g: ops.simple_gla(q, k, v, g)[0]  # noqa: E731
    assert pallas_calls(run, *args) == 0
    assert_close(run(*args), ops.simple_gla(*args, impl="recurrent")[0], F32_OUT, "fallback")
    # A sequence of names falls back the same way, in the order given.
    o, _ = ops.simple_gla(*args, impl=("pallas", "associative"))
    assert_close(o, ops.simple_gla(*args, impl="recurrent")[0], F32_OUT, "sequence")
    # Attention's kernel takes head dims up to 256 too.
    q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 2, 300)), jnp.float32)
    assert pallas_calls(lambda q: ops.attention(q, q, q), q) == 0


def test_an_explicit_name_that_cannot_run_names_the_form_and_why():
    x = recurrence_inputs(t=6, dk=300, dv=4)
    with pytest.raises(ValueError, match=r"simple_gla impl='pallas' cannot run here: .*head dims up to 256.*K=300"):
        ops.simple_gla(x["q"], x["k"], x["v"], x["g"], impl="pallas")
    with pytest.raises(ValueError, match=r"gated_delta_rule impl='pallas' cannot run here"):
        ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], impl="pallas")
    q = jnp.ones((1, 5, 2, 300))
    with pytest.raises(ValueError, match=r"attention impl='pallas' cannot run here: .*head dims up to 256"):
        ops.attention(q, q, q, impl="pallas")
    with pytest.raises(ValueError, match=r"none of impl \['pallas'\] can run here"):
        ops.attention(q, q, q, impl=["pallas"])


@pytest.mark.parametrize("impl", ["fused", (), ("chunk", "fused"), 3, ("chunk", None)])
def test_impl_that_names_no_form_is_a_value_error(impl):
    x = recurrence_inputs(t=4)
    with pytest.raises(ValueError, match="impl must be None, one of"):
        ops.gla(x["q"], x["k"], x["v"], x["gk"], impl=impl)
    with pytest.raises(ValueError, match="impl must be None, one of"):
        ops.attention(x["q"], x["k"], x["k"], impl=impl)


def test_form_unavailable_is_not_a_value_error():
    """A form's refusal is for the dispatcher; a caller never sees it unconverted."""
    assert not issubclass(dispatch.FormUnavailable, ValueError)
    table = dispatch.FormTable("probe", {"only": lambda: (_ for _ in ()).throw(dispatch.FormUnavailable("no"))},
                               {p: ("only",) for p in dispatch.PLATFORMS})
    with pytest.raises(ValueError, match="probe impl='only' cannot run here: no"):
        table.run("only")


def test_a_table_without_a_platform_default_is_refused():
    with pytest.raises(ValueError, match="no default form list"):
        dispatch.FormTable("probe", {"a": len}, {"cpu": ("a",)})
    with pytest.raises(ValueError, match="bad default list"):
        dispatch.FormTable("probe", {"a": len}, {"cpu": ("b",), "gpu": ("a",), "tpu": ("a",)})


# ------------------------------------------------------------------ every form against the reference

EVERY_FORM = every_form()


@pytest.mark.parametrize("check", [c for _, c in EVERY_FORM], ids=[name for name, _ in EVERY_FORM])
def test_every_registered_form_agrees_with_its_reference(check):
    """Each form of each table in op_cases.FORM_TABLES, jitted: a recurrence's against its
    recurrent form (outputs, final states, every input's gradient), the others' against float64
    references."""
    check(jax.jit)


class EveryFormWithoutJitTest(chex.TestCase):
    """Each form run op by op, as an eager caller runs it (the jitted variant is the test above):
    outputs and final states, on one tiny case per recurrence form; gradients are checked jitted."""

    @chex.variants(without_jit=True)
    @parameterized.named_parameters(every_form(tiny=True))
    def test_agrees_with_its_reference(self, check):
        check(self.variant)


def test_every_form_table_of_the_ops_is_checked():
    """A new table (a new op family) fails here until op_cases checks its forms."""
    tables = {
        id(value): value
        for name, module in sys.modules.items()
        if name == "jaxlm.ops" or name.startswith("jaxlm.ops.")
        for value in vars(module).values()
        if isinstance(value, dispatch.FormTable)
    }
    assert {t.op for t in tables.values()} == {t.op for t in FORM_TABLES}
    assert all(any(t is u for u in FORM_TABLES) for t in tables.values())
