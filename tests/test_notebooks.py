"""The Colab notebooks run headless, in order, on the runlocal configuration.

They share one workdir as a user's session would: 01 runs the default
pipeline, 02 reuses its checkpoint, 03 trains one student per loss, 04 builds
the real samples (skipping itself cleanly when `../shared/realdata` is absent).
The kernel gets one CPU device, as a Colab CPU runtime has. Each executed
notebook is written beside the workdir so its figures can be looked at.
"""

import base64
import pathlib

import pytest
from conftest import REALDATA, xla_flags

nbclient = pytest.importorskip("nbclient", reason="the notebooks need the `notebooks` extra")
nbformat = pytest.importorskip("nbformat", reason="the notebooks need the `notebooks` extra")

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
# notebook -> the least number of figures it must display.
NOTEBOOKS = {
  "01_quickstart": 4,
  "02_zero_shot": 4,
  "03_structural_gap": 3,
  "04_real_data": 3 if REALDATA.is_dir() else 0,
}


@pytest.fixture(scope="module")
def session(tmp_path_factory, request):
  """The shared workdir and the kernel's environment (one CPU device)."""
  workdir = tmp_path_factory.mktemp("notebooks")
  mp = pytest.MonkeyPatch()
  request.addfinalizer(mp.undo)
  mp.setenv("RELDISTILL_WORKDIR", str(workdir))
  mp.setenv("XLA_FLAGS", xla_flags(1))
  mp.setenv("JAX_PLATFORMS", "cpu")
  mp.setenv("MPLBACKEND", "agg")
  if REALDATA.is_dir():
    mp.setenv("RELDISTILL_REALDATA", str(REALDATA))
  else:
    mp.delenv("RELDISTILL_REALDATA", raising=False)
  return workdir


def _images(notebook) -> list[bytes]:
  return [
    base64.b64decode(output["data"]["image/png"])
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
    if "image/png" in output.get("data", {})
  ]


def test_committed_notebooks_have_no_outputs():
  for name in NOTEBOOKS:
    notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    for cell in notebook.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{name}: outputs not cleared"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs(name, session):
  notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(
    notebook, timeout=1500, kernel_name="python3", resources={"metadata": {"path": str(COLAB)}}
  )
  try:
    client.execute()
  finally:
    nbformat.write(notebook, session / f"{name}.executed.ipynb")
  images = _images(notebook)
  assert len(images) >= NOTEBOOKS[name], f"{name}: {len(images)} figures displayed"
  for png in images:
    assert png.startswith(b"\x89PNG") and len(png) > 20_000, f"{name}: an empty figure"
  errors = [
    output
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
    if output.get("output_type") == "error"
  ]
  assert not errors, errors
