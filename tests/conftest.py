"""Shared fixtures: tiny IDX data sets written by the tests, configs, subprocess helpers."""

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

# One persistent XLA compilation cache for the whole run: the controller, its xdist workers (they
# inherit the environment) and every command the tests start. Most tests compile the same few small
# programs, in-process and in subprocesses; a cold cache cuts the suite by about a fifth. A fresh
# private folder (mkdtemp: mode 0700), never one another user could write, nor the user's own
# (a JAX_COMPILATION_CACHE_DIR set outside is replaced for the run); removed at the end.
# FASHION_JAX_TEST_XLA_CACHE=0 compiles everything afresh.
_XLA_CACHE = "FASHION_JAX_TEST_XLA_CACHE_DIR"
_OWNS_XLA_CACHE = (os.environ.get("FASHION_JAX_TEST_XLA_CACHE", "1") != "0"
                   and _XLA_CACHE not in os.environ)
if _OWNS_XLA_CACHE:
  os.environ[_XLA_CACHE] = tempfile.mkdtemp(prefix="fashion_jax_test_xla_cache_")
if _XLA_CACHE in os.environ:
  _info = os.stat(os.environ[_XLA_CACHE])  # The one the controller made (workers, subprocesses).
  if _info.st_uid != os.getuid() or _info.st_mode & 0o022:
    raise RuntimeError(f"{_XLA_CACHE}={os.environ[_XLA_CACHE]} is not this user's alone: compiled "
                       "code is never loaded from there; unset it")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_XLA_CACHE]
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

from fashion_jax.data import idx  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATA_ENV = "FASHION_JAX_IDX_DIR"


def make_images(labels: np.ndarray, seed: int) -> np.ndarray:
  """Learnable synthetic images: a bright bar whose position encodes the label, plus noise."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
  for i, label in enumerate(labels):
    row = 2 + 2 * int(label)
    images[i, row:row + 2, 4:24] = 255
  return images


def write_idx_folder(folder: str, n_train: int = 256, n_test: int = 100, gz: bool = True,
                     seed: int = 0) -> str:
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  suffix = ".gz" if gz else ""
  for split, n in (("train", n_train), ("test", n_test)):
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images_name, labels_name = idx.FILES[split]
    idx.write_idx(os.path.join(folder, images_name + suffix), make_images(labels, seed + n))
    idx.write_idx(os.path.join(folder, labels_name + suffix), labels)
  return folder


def pytest_unconfigure(config):
  del config
  if _OWNS_XLA_CACHE:
    shutil.rmtree(os.environ.pop(_XLA_CACHE), ignore_errors=True)


@pytest.fixture
def idx_dir(tmp_path):
  return write_idx_folder(str(tmp_path / "idx"))


@pytest.fixture
def tiny_config(idx_dir):
  from fashion_jax import config_lib
  config = config_lib.load_file(os.path.join(ROOT, "configs", "tiny.py"))
  config.idx_dir = idx_dir
  return config


@pytest.fixture
def real_idx_dir():
  folder = os.environ.get(REAL_DATA_ENV, "")
  if not folder:
    pytest.skip(f"{REAL_DATA_ENV} is not set: no real Fashion-MNIST IDX folder to train on")
  if not os.path.isdir(folder):
    pytest.fail(f"{REAL_DATA_ENV}={folder!r} is set but is not a folder")
  return folder


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 600,
               cwd: str = ROOT):
  """Runs `python -m module args` (from the repository root); returns CompletedProcess."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  full_env.setdefault("JAX_PLATFORMS", "cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def run_module_noting_jax(module: str, *args: str, env: dict | None = None):
  """`run_module` for a command's first checks: returns (CompletedProcess, whether JAX had been
  imported when it ended). The malloc re-exec is off (it would start a Python without the probe)."""
  probe = ("import atexit, runpy, sys; atexit.register(lambda: print('jax imported:', 'jax' in "
           "sys.modules)); sys.argv = sys.argv[1:]; "
           "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "FASHION_JAX_MALLOC": "default", **(env or {})}
  proc = subprocess.run([sys.executable, "-c", probe, module, *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=600)
  last = (proc.stdout.splitlines() or [""])[-1]
  assert last in ("jax imported: True", "jax imported: False"), proc.stdout[-2000:]
  return proc, last.endswith("True")


def _train_in_process(config, workdir: str) -> str:
  from fashion_jax.training import train
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="session")
def trained_tiny_workdir(tmp_path_factory):
  """A finished tiny run on synthetic IDX data (with a validation split). Read-only for tests.

  Its test split is `<workdir>/../idx` (100 images); the model is near-perfect on it.
  """
  from fashion_jax import config_lib
  base = tmp_path_factory.mktemp("trained_tiny")
  config = config_lib.load_file(os.path.join(ROOT, "configs", "tiny.py"))
  config.idx_dir = write_idx_folder(str(base / "idx"))
  config.validation_size = 32
  return _train_in_process(config, str(base / "workdir"))


@pytest.fixture(scope="session")
def trained_real_workdir(tmp_path_factory):
  """The default CNN trained for one epoch on real Fashion-MNIST (~20 s; ~89% test accuracy).

  Skips (with the reason) when FASHION_JAX_IDX_DIR is not set. Read-only for tests.
  """
  folder = os.environ.get(REAL_DATA_ENV, "")
  if not folder:
    pytest.skip(f"{REAL_DATA_ENV} is not set: no real Fashion-MNIST IDX folder to train on")
  from fashion_jax import config_lib
  config = config_lib.load_file(os.path.join(ROOT, "configs", "speedrun_cpu.py"))
  config.idx_dir = os.path.abspath(folder)
  config.num_epochs = 1
  config.num_train_steps = -1  # The speedrun sets a step count; one epoch here.
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 468
  return _train_in_process(config, str(tmp_path_factory.mktemp("trained_real") / "workdir"))


def tensorboard_events(data: bytes):
  """The events of one TensorBoard event file's bytes (TFRecords: length (8 bytes), its CRC (4),
  the event, its CRC (4)), read without TensorFlow."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  pos = 0
  while pos < len(data):
    length = int.from_bytes(data[pos:pos + 8], "little")
    yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4


def assert_one_line_error(proc, *fragments):
  """A usage error: exit 2, exactly one `fashion_jax: error:` line holding each fragment."""
  assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("fashion_jax: error: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  assert "Traceback" not in proc.stderr
  message = errors[0][len("fashion_jax: error: "):]
  assert proc.stderr.count(message) == 1, proc.stderr[-2000:]  # Not also as a log line.


def require_native():
  """Skips (with the reason) where the native kernels cannot be: disabled, or no C++ compiler.
  With a compiler they must build: that is a failure, not a skip."""
  from fashion_jax.kernels import native, native_build  # pylint: disable=import-outside-toplevel
  if native.disabled():  # (=off, =false too: only =0 skipped, the others failed.)
    pytest.skip(f"FASHION_JAX_NATIVE={os.environ['FASHION_JAX_NATIVE']}: the native kernels are "
                "disabled in this run")
  if native_build.compiler() is None and not native.available():
    pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) on this machine: no native kernels")
  assert native.available(), native._load()  # pylint: disable=protected-access
