import gc
import os
import shutil
import sys
import tempfile

import jaxtyping
import pytest

from xla_flags import xla_flags

# Eight fake CPU devices for sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for this test session, shared with the training runs that
# tests start as subprocesses: they compile the same programs. (No size limit: with one, every
# write scans the whole cache folder under a file lock, which made the suite markedly slower.)
# The process that makes the folder (pytest's controller; xdist workers inherit it) removes it.
CREATED_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    CREATED_CACHE_DIR = tempfile.mkdtemp(prefix="jaxlm-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = CREATED_CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402  (after the environment above)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop every compiled program when a test module ends. Each CPU executable keeps its own
    memory mappings, and a process may hold at most vm.max_map_count (65,530) of them: test_models
    alone reaches 20,000, and late in the suite, with every program kept, jaxlib segfaulted in the
    compiler (or serialising into the cache) when a mapping failed. Cleared per module, the suite
    stays under 20,000."""
    yield
    jax.clear_caches()
    gc.collect()


# Shape-checked tests (jaxlm/typing.py): jaxtyping's import hook wraps every function of
# jaxlm.ops and jaxlm.layers imported from here on in a beartype checker, so an array that breaks
# an annotation fails the suite. It must come before any import of jaxlm; users' imports are never
# wrapped. is_pep484_tower: an int is a valid float, as PEP 484 says.
if "jaxlm" in sys.modules:
    raise RuntimeError("jaxlm was imported before tests/conftest.py could install the type-checking hook")
jaxtyping.install_import_hook(
    ["jaxlm.ops", "jaxlm.layers"], "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))"
)


# The modules that take longest, slowest first (by --durations on the 2-core machine, 2026-12-04). A worker
# runs whole modules (--dist loadfile), taken in collection order, so these start at once and no
# long module is left running alone at the end; xdist's own reordering, by test count, put
# test_train.py last.
SLOWEST_MODULES_FIRST = (
    "test_train.py", "test_models.py", "test_notebooks.py", "test_gla_family.py", "test_pallas_tpu_interpret.py",
    "test_long_context.py", "test_experiments_scaling.py", "test_experiments_recall.py", "test_run_folder.py",
    "test_dispatch.py", "test_training_parts.py", "test_fuzz_arguments.py", "test_pallas_attention.py",
    "test_nonfinite.py", "test_kda.py", "test_hf_interop.py", "test_sharding.py",
    "test_cli_errors_generate_convert.py", "test_cli_errors.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config: pytest.Config) -> None:
    if CREATED_CACHE_DIR is not None:
        shutil.rmtree(CREATED_CACHE_DIR, ignore_errors=True)
