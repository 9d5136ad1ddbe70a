"""Every tutorial notebook runs from top to bottom without an error in its smoke configuration.

Each ``tutorials/*.ipynb`` is one test (its id is the file name), executed with nbclient in
``tutorials/`` with ``PYRO_FLOWS_SMOKE=1``, which makes the notebooks cut their step counts
(all of them together should take well under three minutes on two cores). The executed copy is
thrown away; the committed notebooks keep the outputs of a full run.

The kernel is the interpreter running the tests (``sys.executable``), given to nbclient through
a kernel-spec manager of our own. So the notebooks import exactly the environment under test,
whatever ``python3`` kernelspecs exist elsewhere (a user-level ``~/.local/share/jupyter`` spec
would otherwise shadow the one in the virtual environment) and with no setup step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
kernelspec = pytest.importorskip("jupyter_client.kernelspec")
manager = pytest.importorskip("jupyter_client.manager")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; a smoke run takes a few


class _ThisInterpreter(kernelspec.KernelSpecManager):
    """Every kernel name resolves to an IPython kernel on ``sys.executable``."""

    def get_kernel_spec(self, kernel_name: str) -> Any:
        return kernelspec.KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})",
            language="python",
        )


def _run(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    env = {**os.environ, "PYRO_FLOWS_SMOKE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MPLBACKEND", None)  # let ipykernel pick its inline (headless) backend
    km = manager.KernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreter())
    client = nbclient.NotebookClient(
        notebook,
        km=km,
        timeout=CELL_TIMEOUT,
        startup_timeout=120,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},  # the kernel's working directory
    )
    # cleanup_kc: shut the kernel down and close its sockets (nbclient leaves a km it did not
    # create running otherwise). Raises CellExecutionError, with the traceback, on any error.
    client.execute(env=env, cleanup_kc=True)


def test_there_are_tutorials() -> None:
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path: Path) -> None:
    _run(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_with_outputs(path: Path) -> None:
    """The docs render the committed outputs, so they must be those of one clean run."""
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}; run the whole notebook top to bottom in a "
        f"fresh kernel (without PYRO_FLOWS_SMOKE) and save it"
    )
    errors = [c.source[:60] for c in cells if any(o.output_type == "error" for o in c.outputs)]
    assert not errors, f"{path.name}: cells saved with an error output: {errors}"
    assert any(c.outputs for c in cells), f"{path.name}: saved without outputs"
