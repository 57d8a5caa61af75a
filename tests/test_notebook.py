"""Executes examples/hica_loss_playground.ipynb so that it never rots."""
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "hica_loss_playground.ipynb"


def test_loss_playground_notebook_executes(tmp_path, monkeypatch):
  # The kernel is a fresh process: it finds hica_jax via PYTHONPATH (also in
  # a clone that is not pip-installed) and writes its figure to tmp_path.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  monkeypatch.setenv("PLAYGROUND_OUT_DIR", str(tmp_path))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  assert "sharded == single device" in text
  figure = tmp_path / "hica_loss_playground.png"
  assert figure.exists() and figure.stat().st_size > 10_000
