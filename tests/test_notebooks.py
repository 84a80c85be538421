"""The notebooks of colab/: each runs top to bottom in smoke mode on one CPU device, and each is
committed without outputs.

Every ``colab/*.ipynb`` is picked up, so a new notebook is tested as soon as it is added. Each one
runs in a fresh Jupyter kernel (nbclient) with JAXLM_NOTEBOOK_SMOKE=1, the suite's XLA flags for
one device (a notebook that wants fake devices sets them itself, as it must on a Colab CPU
runtime) and its compilation cache, and its working and temporary folders in the test's tmp_path;
a cell that raises fails the test, with the cell's source and traceback in the message.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from xla_flags import xla_flags

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # one cell; the notebooks are sized to run whole in about a minute in smoke mode


def kernel_env(tmp_path: Path) -> dict[str, str]:
    """The kernel's environment: this process's (its compilation cache included), on one CPU
    device, smoke sizes, temporary files under tmp_path."""
    return {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu", "JAXLM_NOTEBOOK_SMOKE": "1",
            "TMPDIR": str(tmp_path), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}


def test_the_notebooks_exist():
    assert {"00_quickstart.ipynb", "01_linear_attention.ipynb", "02_kernels.ipynb", "03_moe_sharding.ipynb",
            "04_recall_and_hybrids.ipynb", "05_open_models.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown", f"{path.name} must open with a markdown cell stating its claims"
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=kernel_env(tmp_path))
    except CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell failed in smoke mode:\n{err}", pytrace=False)
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert ran and all(c.execution_count is not None for c in ran), f"{path.name}: not every code cell ran"
    errors = [o for c in ran for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
