"""Execute every tutorial notebook (tutorials/*.ipynb) in small mode; any cell error fails.

Each notebook reads `PPL_EXT_TUTORIAL_SMALL=1` to shrink its sample sizes and step counts, and
matplotlib renders with the non-interactive Agg backend. The kernel is the `python3`
kernelspec, which jupyter_client launches with this interpreter (`sys.executable`) when
ipykernel is installed in the same environment; the test checks that before running cells.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="tutorial tests need the 'test' extra")
nbclient = pytest.importorskip("nbclient", reason="tutorial tests need the 'test' extra")
pytest.importorskip("ipykernel", reason="tutorial tests need the 'test' extra")
pytest.importorskip("matplotlib", reason="tutorial tests need the 'test' extra")

from nbclient.exceptions import CellExecutionError  # noqa: E402

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
_PREFIX_MARKER = "PPL_EXT_KERNEL_PREFIX="


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_tutorial_runs(path: Path, monkeypatch: pytest.MonkeyPatch):
    # The kernel process inherits this environment when it starts.
    monkeypatch.setenv("PPL_EXT_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    # An extra first cell (in memory only) reports which environment the kernel runs in.
    nb.cells.insert(
        0, nbformat.v4.new_code_cell(f"import sys; print({_PREFIX_MARKER!r} + sys.prefix)")
    )
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell raised an error:\n{err}", pytrace=False)

    stdout = "".join(
        out.get("text", "") for out in nb.cells[0].outputs if out.output_type == "stream"
    )
    assert _PREFIX_MARKER + sys.prefix in stdout, (
        f"the notebook kernel did not run in this environment ({sys.prefix}): {stdout!r}"
    )
    errors = [
        (i, out.ename)
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors, f"{path.name}: cells with errors: {errors}"


def test_tutorials_are_stored_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name}: cell {i} has stored outputs"
                assert cell.execution_count is None, f"{path.name}: cell {i} has a count"
