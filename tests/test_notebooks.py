"""The research notebooks run from scratch without an error (nbclient, a fresh kernel each).

Each notebook asserts its own results (parity with upstream, round trips, equal losses), so an
error in any cell, an assertion included, fails its test.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_all_four_notebooks_are_here():
  assert [p.stem for p in NOTEBOOKS] == ["01_packed_sequence", "02_text_to_image", "03_training_step", "04_weights"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:  # run from scratch: no saved outputs can satisfy anything
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
