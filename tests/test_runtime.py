"""jaxlm.runtime: what a notebook adapts to. The CPU branch on this machine's devices; the GPU and
TPU branches on stand-in devices (the choices depend only on a device's platform and kind)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import pytest

from jaxlm import ops, runtime
from jaxlm.axis_names import DATA, MESH_AXES
from jaxlm.ops.linear_recurrence import RECURRENCE_DEFAULTS


@dataclass(frozen=True)
class StandIn:
    """Just what detect reads of a jax Device."""

    platform: str
    device_kind: str


def test_cpu_runtime_of_this_machine():
    rt = runtime.detect(environ={})
    assert rt.platform == "cpu" and rt.device_kind == jax.local_devices()[0].device_kind
    assert rt.device_count == len(jax.local_devices())
    assert (rt.dtype, rt.impl, rt.default_forms, rt.smoke) == ("float32", None, ("chunk",), False)
    assert rt.describe() == (f"cpu: {rt.device_count} x {rt.device_kind}; compute dtype float32; "
                             "impl=None tries ['chunk']; full sizes")


def test_mesh_puts_every_local_device_on_the_data_axis():
    rt = runtime.detect(environ={})
    mesh = rt.mesh()
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {a: (len(jax.local_devices()) if a == DATA else 1) for a in MESH_AXES}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.local_devices())


def test_mesh_of_a_runtime_for_other_devices_is_refused():
    rt = runtime.detect(devices=[StandIn("cpu", "cpu")] * (len(jax.local_devices()) + 1), environ={})
    with pytest.raises(ValueError, match="call runtime.detect"):
        rt.mesh()


def test_tpu_runtime_computes_in_bfloat16_and_tries_the_kernels_first():
    rt = runtime.detect(devices=[StandIn("tpu", "TPU v2")] * 8, environ={runtime.SMOKE_ENV: "0"})
    assert (rt.platform, rt.device_kind, rt.device_count) == ("tpu", "TPU v2", 8)
    assert rt.dtype == "bfloat16" and rt.impl is None
    assert rt.default_forms == ("pallas", "chunk") == RECURRENCE_DEFAULTS["tpu"]
    assert rt.batch_size(4) == 32


def test_gpu_runtime_computes_in_float32_and_tries_the_kernels_first():
    rt = runtime.detect(devices=[StandIn("gpu", "Tesla T4")], environ={})
    assert (rt.platform, rt.dtype, rt.default_forms, rt.device_count) == ("gpu", "float32", ("pallas", "chunk"), 1)


def test_another_backend_counts_as_cpu_as_the_dispatch_does():
    rt = runtime.detect(devices=[StandIn("METAL", "Apple M2")], environ={})
    assert (rt.platform, rt.dtype, rt.default_forms) == ("cpu", "float32", ("chunk",))


def test_the_dtype_is_one_a_model_config_takes():
    from jaxlm.models import preset

    for platform in ("cpu", "gpu", "tpu"):
        config = preset("qwen3_next", "tiny", dtype=runtime.compute_dtype(platform))
        assert config.compute_dtype == np.dtype(runtime.COMPUTE_DTYPES[platform])
    with pytest.raises(ValueError, match="platform must be one of"):
        runtime.compute_dtype("neuron")


def test_impl_none_is_what_the_ops_run_by_default():
    """The runtime's impl (None) gives the op the same numbers as the form it names for this platform."""
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 40, 2, 8))
    rt = runtime.detect(environ={})
    by_default = ops.linear_attn(q, k, v, impl=rt.impl)[0]
    named = ops.linear_attn(q, k, v, impl=rt.default_forms[0])[0]
    np.testing.assert_array_equal(np.asarray(by_default), np.asarray(named))


@pytest.mark.parametrize("value, smoke", [("1", True), ("0", False), ("", False), (" 1 ", True), (None, False)])
def test_smoke_flag(value, smoke):
    environ = {} if value is None else {runtime.SMOKE_ENV: value}
    assert runtime.smoke_mode(environ) is smoke
    rt = runtime.detect(environ=environ)
    assert rt.smoke is smoke
    assert rt.choose(full=4096, smoke=128) == (128 if smoke else 4096)
    assert rt.describe().endswith("smoke sizes" if smoke else "full sizes")


def test_smoke_flag_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv(runtime.SMOKE_ENV, "1")
    assert runtime.smoke_mode() and runtime.detect().smoke
    monkeypatch.delenv(runtime.SMOKE_ENV)
    assert not runtime.smoke_mode()


@pytest.mark.parametrize("value", ["yes", "true", "2", "-1", "on"])
def test_smoke_flag_other_than_0_or_1_is_refused(value):
    with pytest.raises(ValueError, match=f"{runtime.SMOKE_ENV} must be 0 or 1.*{value!r}"):
        runtime.detect(environ={runtime.SMOKE_ENV: value})


@pytest.mark.parametrize("rows", [0, -2, 1.5, True, "4"])
def test_batch_size_needs_a_positive_int(rows):
    with pytest.raises(ValueError, match="rows_per_device must be an int >= 1"):
        runtime.detect(environ={}).batch_size(rows)


def test_no_devices_is_refused():
    with pytest.raises(ValueError, match="at least one device"):
        runtime.detect(devices=[], environ={})
