import os
import sys
import tempfile

import jaxtyping

# Eight fake CPU devices for sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for this test session, shared with the training runs that
# tests start as subprocesses: they compile the same programs as the in-process runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxlm-test-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# ...but this process itself neither reads nor writes it: late in the full suite jaxlib 0.10.2
# segfaulted serialising an executable into the cache, in three runs out of three, each time in a
# different in-process training test (never when they ran alone). Subprocesses keep the cache.
import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_enable_compilation_cache", False)

# Shape-checked tests (jaxlm/typing.py): jaxtyping's import hook wraps every function of
# jaxlm.ops and jaxlm.layers imported from here on in a beartype checker, so an array that breaks
# an annotation fails the suite. It must come before any import of jaxlm; users' imports are never
# wrapped. is_pep484_tower: an int is a valid float, as PEP 484 says.
if "jaxlm" in sys.modules:
    raise RuntimeError("jaxlm was imported before tests/conftest.py could install the type-checking hook")
jaxtyping.install_import_hook(
    ["jaxlm.ops", "jaxlm.layers"], "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"
)
