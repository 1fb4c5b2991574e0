"""launch/colab.ipynb runs top to bottom (shortened runs, CPU), its install cell pointed here;
and with its runs in a Cloud Storage bucket (the emulator of tests/test_cloud.py)."""

import glob
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from fashion_jax.support import backends, paths
from tests.conftest import ROOT, write_idx_folder
from tests.test_cloud import BUCKET, _Bucket, emulator  # pylint: disable=unused-import

NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")


def _execute(tmp_path, monkeypatch, runs="", skip=(), idx_dir=None, colab=None):
  """Runs the notebook's cells (but those containing a string in `skip`) in a fresh kernel; the
  text each code cell printed, in order. `idx_dir`: the data's folder (else a small one made
  here). `colab`: a folder standing in for Colab's /content, with google.colab (_colab_stub)
  imported in the kernel, as Colab's own kernel has."""
  nbformat = pytest.importorskip("nbformat", reason="pip install 'fashion_jax[test]'")
  nbclient = pytest.importorskip("nbclient", reason="pip install 'fashion_jax[test]'")
  monkeypatch.setenv("FASHION_JAX_REPO", ROOT)
  monkeypatch.setenv("FASHION_JAX_RUNS", runs)
  monkeypatch.setenv("FASHION_JAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # The notebook's local files go to a folder made here.
  # Offline here: a small synthetic data set stands in for the one a user would download.
  monkeypatch.setenv("FASHION_JAX_IDX_DIR", idx_dir or write_idx_folder(
      str(tmp_path / "idx"), n_train=5600, n_test=200))  # cpu_best holds out 5,000.
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  notebook.cells = [c for c in notebook.cells if not any(s in c.source for s in skip)]
  if colab:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [_colab_stub(tmp_path), os.environ.get("PYTHONPATH")])))
    for cell in notebook.cells:
      cell.source = cell.source.replace("'/content", f"'{colab}")
    notebook.cells.insert(0, nbformat.v4.new_code_cell("import google.colab"))
  # One notebook at a time in this environment: each one's install cell pip-installs into it, and
  # two pips at once (the suite's -n auto workers) can break each other's install.
  with paths.exclusive(os.path.join(sys.prefix, ".fashion_jax_notebook_test.lock")):
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  return ["".join(o.get("text", "") for o in c.outputs)
          for c in notebook.cells[1 if colab else 0:] if c.cell_type == "code"]


_STUB = {
    "__init__.py": "",
    "drive.py": """
import os
def mount(mountpoint, **kwargs):  # Colab's Drive appears under the mount point as MyDrive.
  os.makedirs(mountpoint, exist_ok=True)
  if not os.path.lexists(os.path.join(mountpoint, 'MyDrive')):
    os.symlink(os.environ['STUB_MY_DRIVE'], os.path.join(mountpoint, 'MyDrive'))
  print('Mounted at', mountpoint)
""",
    "auth.py": """
def authenticate_user(**kwargs):
  print('[stub] authenticate_user')
""",
    "files.py": """
import io, os
from PIL import Image, ImageDraw
def upload(target_dir=''):  # As colabtools since 2024: {path saved at: contents}; a name taken
  image = Image.new('RGB', (200, 240), 'white')  # gets ' (1)' added.
  ImageDraw.Draw(image).rectangle([50, 30, 150, 210], fill=(30, 30, 30))
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG')
  os.makedirs(target_dir or '.', exist_ok=True)
  path = base = os.path.join(target_dir, 'shirt.jpg')
  while os.path.lexists(path):
    path = base.replace('.jpg', f' ({1 + path.count("(")}).jpg')
  with open(path, 'wb') as f:
    f.write(buffer.getvalue())
  print('Saving shirt.jpg to', path)
  return {path: buffer.getvalue()}
""",
}


def _colab_stub(tmp_path) -> str:
  """A folder for PYTHONPATH holding a stand-in google.colab (drive, auth, files); google stays a
  namespace package, as protobuf's."""
  folder = tmp_path / "colab_stub"
  (folder / "google" / "colab").mkdir(parents=True)
  for name, text in _STUB.items():
    (folder / "google" / "colab" / name).write_text(text)
  return str(folder)


def test_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  _, install, devices, default, recipe, benchmark, tensorboard, predict = _execute(
      tmp_path, monkeypatch)
  assert "kept: jax " in install and "numpy" in install  # And asserted unchanged, in the cell.
  assert "JAX " in devices and "on cpu" in devices
  # This machine's own device files (JAX_PLATFORMS=cpu here): a CPU runtime, or the fallback.
  assert ("!!! this runtime has" if backends.accelerators() else "No GPU or TPU") in devices
  assert "done: step 10" in default and "test accuracy" in default
  assert "done: step 10" in recipe
  (runs,) = glob.glob(str(tmp_path / "fashion_jax_notebook_*"))
  with open(os.path.join(runs, "fj_cpu_best", "config.json")) as f:  # Each recipe its own workdir.
    assert json.load(f)["model"] == "cnn_bn"  # The CPU runtime's recipe: configs/cpu_best.py.
  assert "best:" in benchmark
  assert "event file(s)" in tensorboard and "tensorboard --logdir" in tensorboard
  assert "sample_trousers.jpg" in predict


def test_colab_notebook_keeps_its_runs_in_a_bucket(emulator, tmp_path, monkeypatch):
  """RUNS=gs://...: the runs, their metrics and TensorBoard files in the bucket, read back by the
  notebook; nothing of them on the local disk. (The recipe and the benchmark cells are skipped:
  they use RUNS as the default cell does, and cost a minute.)"""
  _, install, _, default, tensorboard, predict = _execute(
      tmp_path, monkeypatch, runs=f"gs://{BUCKET}/notebook/",
      skip=("RECIPE = ", "fashion_jax.benchmark"))
  assert "kept: jax " in install and "fsspec" in install
  assert "done: step 10" in default and "test accuracy" in default
  assert f"event file(s) in gs://{BUCKET}/notebook/fj_default/tensorboard" in tensorboard
  assert "sample_trousers.jpg" in predict
  bucket = _Bucket()
  assert "metrics.jsonl" in bucket.names("notebook/fj_default")
  assert bucket.names("notebook/fj_default/checkpoints") == ["10"]
  (local,) = glob.glob(str(tmp_path / "fashion_jax_notebook_*"))
  assert not os.path.exists(os.path.join(local, "fj_default"))


def test_on_colab_an_idx_dir_on_drive_mounts_drive(tmp_path, monkeypatch):
  """IDX_DIR on Drive, the checkout and the runs not: Drive is mounted (the mount had looked at
  REPO and RUNS only, so the run found no data), the default config trains from it, and an
  upload is classified under the name Colab saved it as. (The recipe, the benchmark and
  TensorBoard's cell are skipped: a minute, and a TensorBoard server.)"""
  content = tmp_path / "content"
  (content / "uploads").mkdir(parents=True)
  (content / "uploads" / "shirt.jpg").write_bytes(b"an earlier upload")
  write_idx_folder(str(tmp_path / "my_drive" / "fashion_mnist"), n_train=256, n_test=100)
  monkeypatch.setenv("STUB_MY_DRIVE", str(tmp_path / "my_drive"))
  _, install, devices, default, predict = _execute(
      tmp_path, monkeypatch, idx_dir=str(content / "drive" / "MyDrive" / "fashion_mnist"), colab=str(content),
      skip=("RECIPE = ", "fashion_jax.benchmark", "load_ext"))
  assert f"Mounted at {content}/drive" in install
  assert "on cpu" in devices
  assert "done: step 10" in default and "test accuracy" in default
  assert os.path.isfile(content / "fj_default" / "config.json")  # RUNS: /content, its default.
  # The path Colab saved the upload at (a name taken: ' (1)' added), not a copy, nor the sample.
  assert f"{content}/uploads/shirt (1).jpg " in predict and "sample_trousers" not in predict, predict


def test_a_data_error_names_the_notebooks_setting(tmp_path):
  """The command's data error names --config.idx_dir and FASHION_JAX_IDX_DIR, neither of which a
  notebook user sets: the cell says IDX_DIR."""
  driver = _first_cell() + """
try:
  sh(PY, '-m', 'fashion_jax.main', '--config=configs/default.py', f'--workdir={RUNS}/fj')
except RuntimeError as e:
  print('raised:', e)
"""
  out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, check=True,
                       timeout=120, env=dict(os.environ, TMPDIR=str(tmp_path), JAX_PLATFORMS="cpu",
                                             FASHION_JAX_REPO=ROOT,
                                             FASHION_JAX_IDX_DIR=str(tmp_path / "missing"))).stdout
  *_, error, hint, raised = out.splitlines()
  assert "FASHION_JAX_IDX_DIR" in error and "missing" in error
  assert hint.startswith("In this notebook: set IDX_DIR in the first cell"), hint
  assert raised.startswith("raised: exit status 2"), raised


@pytest.mark.parametrize("idx_dir, expected", [
    ("", None), ("data/idx", "ROOT/data/idx"), ("/abs/idx", "/abs/idx")])
def test_idx_dir_reaches_the_commands(tmp_path, idx_dir, expected):
  """IDX_DIR, set in the first cell, is the commands' $FASHION_JAX_IDX_DIR (a relative one from
  ROOT: they run in the checkout)."""
  driver = _first_cell() + "\nprint(ROOT); sh(PY, '-c', 'import os; print(os.environ.get(\"FASHION_JAX_IDX_DIR\"))')"
  out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, check=True,
                       timeout=60, env=dict(os.environ, TMPDIR=str(tmp_path), FASHION_JAX_REPO=ROOT,
                                            FASHION_JAX_IDX_DIR=idx_dir)).stdout
  root, got = out.split()
  assert got == (expected.replace("ROOT", root) if expected else "None")


def test_an_older_runtime_is_told_in_one_line(tmp_path):
  """A runtime pinned to an older version (orbax-checkpoint 0.12.1 below the floor 0.12.4; here
  the pin added by PIP_CONSTRAINT): pip's ResolutionImpossible, a traceback and pip's advice to
  loosen the versions were all the install cell said."""
  (tmp_path / "older.txt").write_text("orbax-checkpoint==0.12.1\n")
  driver = _first_cell() + "\n" + _cell("runtime-constraints.txt")
  with paths.exclusive(os.path.join(sys.prefix, ".fashion_jax_notebook_test.lock")):  # A pip.
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path), FASHION_JAX_REPO=ROOT,
                                               PIP_CONSTRAINT=str(tmp_path / "older.txt")))
  assert out.returncode == 1 and out.stdout == "", out.stdout + out.stderr
  assert re.match(r"fashion_jax's requirements conflict with this runtime's packages \(fashion-jax"
                  r"(\[serve\])? \S+ depends on orbax-checkpoint>=\S+; this runtime has "
                  r"orbax-checkpoint==0\.12\.1", out.stderr), out.stderr
  assert out.stderr.count("\n") == 1 and "supports Colab's current runtime" in out.stderr


def _first_cell() -> str:
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)["cells"][1]["source"]


def _cell(text: str) -> str:
  """The code cell containing `text`."""
  with open(NOTEBOOK, encoding="utf-8") as f:
    (source,) = [c["source"] for c in json.load(f)["cells"]
                 if c["cell_type"] == "code" and text in c["source"]]
  return source


_FALLBACK = """
import atexit, os
atexit.register(os.write, 2, b"E1207 03:29:13.115490 1 client.cc:99] a C++ log line at exit\\n")
try:
  from fashion_jax.support import backends
  backends.accelerators = lambda root="/": {"tpu": "4 TPU chip(s) (/dev/accel0)"}
except ImportError:
  pass
"""


def test_the_devices_cell_says_when_jax_fell_back_to_the_cpu(tmp_path):
  """A TPU runtime whose JAX started on the CPU (here: device files made up, JAX_PLATFORMS=cpu)
  is named as such, with the cause, in the devices cell, not only by the training command; and a
  line JAX's C++ logging writes to stderr at exit (read with stdout, it was taken for the JSON)
  does not break the cell."""
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(_FALLBACK)
  driver = _first_cell() + "\n" + _cell("compute_capability")
  out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, TMPDIR=str(tmp_path), FASHION_JAX_REPO=ROOT,
                                JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path / "site")))
  assert out.returncode == 0, out.stdout + out.stderr
  _, fallback = out.stdout.splitlines()
  assert fallback.startswith("!!! this runtime has 4 TPU chip(s) (/dev/accel0) but JAX runs on "
                             "the CPU: JAX_PLATFORMS=cpu is set"), fallback
  assert "recipe cell runs configs/cpu_best.py" in fallback


_CHILD = """
import signal, sys, time
def stop(*_):
  print('child: saving', flush=True)
  time.sleep(1)
  print('child: saved, exit 75', flush=True)
  sys.exit(75)
signal.signal(signal.SIGINT, stop)
print('child: started', flush=True)
while True:
  time.sleep(0.05)
"""


def test_an_interrupted_cell_waits_for_the_command_to_save_and_shows_it(tmp_path):
  """Colab's interrupt reaches the kernel and the training command alike: `sh` raised at once,
  leaving the command saving in the background (a re-run found the run still busy) and its
  'saved' lines unseen."""
  driver = _first_cell() + f"""
try:
  sh(sys.executable, '-c', {_CHILD!r})
except KeyboardInterrupt:
  print('kernel: interrupted', flush=True)
"""
  proc = subprocess.Popen([sys.executable, "-u", "-c", driver], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, TMPDIR=str(tmp_path)), start_new_session=True)
  assert proc.stdout.readline() == "child: started\n"
  os.killpg(proc.pid, signal.SIGINT)  # The kernel's whole process group, as Colab's interrupt.
  out, _ = proc.communicate(timeout=60)
  assert out == "child: saving\nchild: saved, exit 75\nkernel: interrupted\n", out


@pytest.mark.parametrize("repo, checkout", [
    ("fashion_jax", "ROOT/fashion_jax"), ("https://github.com/me/fashion_jax", "ROOT/fashion_jax"),
    ("git@github.com:me/fashion_jax.git", "ROOT/fashion_jax"), ("/abs/checkout", "/abs/checkout")])
def test_the_checkout_does_not_depend_on_the_working_directory(tmp_path, repo, checkout):
  """A relative REPO was looked up from the working directory, which the install cell changes to
  the checkout: running that cell again installed from fashion_jax/fashion_jax."""
  (tmp_path / "elsewhere").mkdir()
  driver = _first_cell() + "\nprint(ROOT); print(CHECKOUT)"
  out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, check=True,
                       cwd=tmp_path / "elsewhere", timeout=60,
                       env=dict(os.environ, TMPDIR=str(tmp_path), FASHION_JAX_REPO=repo)).stdout
  root, got = out.split()
  assert got == checkout.replace("ROOT", root)


@pytest.mark.parametrize("runs, expected", [
    ("", "ROOT"), ("runs", "ROOT/runs"), ("drive/MyDrive/fj/", "ROOT/drive/MyDrive/fj"),
    ("/abs/runs/", "/abs/runs"), ("gs://bucket/fj/", "gs://bucket/fj")])
def test_a_relative_runs_is_taken_from_the_root_not_the_checkout(tmp_path, runs, expected):
  """The commands run in the checkout (sh's working directory): a relative RUNS put the runs inside
  it, while the kernel's own reads (metrics.jsonl, TensorBoard) looked for them elsewhere."""
  driver = _first_cell() + "\nprint(ROOT); print(RUNS)"
  out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, check=True,
                       timeout=60, env=dict(os.environ, TMPDIR=str(tmp_path),
                                            FASHION_JAX_REPO=ROOT, FASHION_JAX_RUNS=runs)).stdout
  root, got = out.split()
  assert got == expected.replace("ROOT", root)
