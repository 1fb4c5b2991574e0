"""launch/colab.ipynb runs top to bottom (shortened runs, CPU), its install cell pointed here."""

import glob
import json
import os

import pytest

from tests.conftest import ROOT, write_idx_folder

NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")


def test_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat", reason="pip install 'fashion_jax[test]'")
  nbclient = pytest.importorskip("nbclient", reason="pip install 'fashion_jax[test]'")
  monkeypatch.setenv("FASHION_JAX_REPO", ROOT)
  monkeypatch.setenv("FASHION_JAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # The notebook's runs go to a folder made here.
  # Offline here: a small synthetic data set stands in for the one a user would download.
  monkeypatch.setenv("FASHION_JAX_IDX_DIR", write_idx_folder(str(tmp_path / "idx"), n_train=5600,
                                                          n_test=200))  # cpu_best holds out 5,000.
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()

  def output(index):
    cell = [c for c in notebook.cells if c.cell_type == "code"][index]
    return "".join(o.get("text", "") for o in cell.outputs)

  install, devices, default, recipe, benchmark, tensorboard, predict = map(output, range(1, 8))
  assert "kept: jax " in install and "numpy" in install  # And asserted unchanged, in the cell.
  assert "JAX " in devices and "on cpu" in devices
  assert "done: step 10" in default and "test accuracy" in default
  assert "done: step 10" in recipe
  (runs,) = glob.glob(str(tmp_path / "fashion_jax_notebook_*"))
  with open(os.path.join(runs, "fj_recipe", "config.json")) as f:
    assert json.load(f)["model"] == "cnn_bn"  # The CPU runtime's recipe: configs/cpu_best.py.
  assert "best:" in benchmark
  assert "event file(s)" in tensorboard and "tensorboard --logdir" in tensorboard
  assert "sample_trousers.jpg" in predict
