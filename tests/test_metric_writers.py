"""metrics.jsonl and TensorBoard: written without importing PyTorch (tensorboardX would)."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from tests.conftest import ROOT

# A stand-in `torch` package that records being imported: tensorboardX imports torch at its own
# import whenever torch is installed (1.4-5 s per run on Colab-like machines).
_FAKE_TORCH = """
import os
open(os.environ["TORCH_IMPORTED"], "w").close()
class Tensor: pass
"""

_RUN = r"""
import os, sys
if sys.argv[1] == "torch-first":
  import torch
from fashion_jax.support import metric_writers
writer = metric_writers.MetricWriter(sys.argv[2])
writer.write(1, {"eval_accuracy": 0.5})
writer.flush()
writer.close()
print("torch" in sys.modules, sys.modules.get("torch") is not None)
"""


def _run(tmp_path, mode):
  fake = tmp_path / "site"
  (fake / "torch").mkdir(parents=True)
  (fake / "torch" / "__init__.py").write_text(textwrap.dedent(_FAKE_TORCH))
  marker, workdir = tmp_path / "torch_imported", tmp_path / "work"
  workdir.mkdir()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), ROOT]),
         "TORCH_IMPORTED": str(marker)}
  out = subprocess.run([sys.executable, "-c", _RUN, mode, str(workdir)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  events = os.listdir(workdir / "tensorboard")
  return out.stdout.split(), marker.exists(), events, (workdir / "metrics.jsonl").read_text()


def test_tensorboard_is_written_without_importing_torch(tmp_path):
  in_modules, imported, events, lines = _run(tmp_path, "no-torch")
  assert not imported, "tensorboardX imported torch"
  assert in_modules == ["False", "False"]  # And `import torch` works again afterwards.
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert '"eval_accuracy": 0.5' in lines


def test_torch_already_imported_is_left_alone(tmp_path):
  in_modules, imported, events, _ = _run(tmp_path, "torch-first")
  assert imported and in_modules == ["True", "True"]
  assert any(name.startswith("events.out.tfevents") for name in events)


_DISK_FILLS = r"""
import errno, sys, time
from fashion_jax.support import metric_writers
from fashion_jax.support.errors import UserError
writer = metric_writers.MetricWriter(sys.argv[1])
writer.write(1, {"loss": 1.0})
def full(*args):
  raise OSError(errno.ENOSPC, "No space left on device")
writer._tb.file_writer.event_writer._ev_writer.write_event = full  # The disk fills.
if sys.argv[2] == "buffered":  # What the thread wrote is still in the file's buffer: each
  writer._tb.file_writer.event_writer._ev_writer.flush = full  # flush fails again (at exit too).
try:
  with writer:
    for step in range(2, 200):
      writer.write(step, {f"value_{i}": 1.0 for i in range(8)})
      time.sleep(0.02)
except UserError as e:
  print(f"fashion_jax: error: {e}", file=sys.stderr)
  sys.exit(2)
"""


@pytest.mark.parametrize("flush", ["works", "buffered"])
def test_a_full_disk_met_by_tensorboards_thread_is_one_line_not_a_hang(tmp_path, flush):
  """tensorboardX writes in a thread: a full disk ended it, its queue of values (10) filled and
  the next value waited for ever (process 0 of a run hung; the others in their collective).
  On a real full disk the bytes it could not write stay buffered: tensorboardX's own close at
  exit flushed them again and printed a traceback after the one line."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  try:
    proc = subprocess.run([sys.executable, "-c", _DISK_FILLS, str(tmp_path), flush], cwd=ROOT,
                          env=env,
                          capture_output=True, text=True, timeout=60)
  except subprocess.TimeoutExpired:
    raise AssertionError("the run hung once TensorBoard's writer had failed") from None
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"fashion_jax: error: no space left where {tmp_path / 'tensorboard'} is written (No space "
      "left on device); free some space (or use another --workdir) and re-run the same command: "
      "it resumes from the last checkpoint, which is intact"], proc.stderr[-2000:]


def test_a_closed_writer_leaves_threading_excepthook_as_it_was(tmp_path):
  """Each writer chained a hook of its own into threading.excepthook and never took it out: a
  process that trained several times (the benchmark, a notebook) kept every writer alive and a
  thread's error went through one more hook per run. Closing twice was an AttributeError."""
  from fashion_jax.support import metric_writers  # pylint: disable=g-import-not-at-top
  before = threading.excepthook
  for run in range(2):
    (tmp_path / str(run)).mkdir()
    writer = metric_writers.MetricWriter(str(tmp_path / str(run)))
    writer.write(1, {"loss": 1.0})
    assert threading.excepthook is not before  # (Watched: tensorboardX 2.6's writer.)
    writer.close()
    assert threading.excepthook is before
    writer.close()
    writer.flush()


def test_a_last_record_without_its_newline_is_ended_on_resume(tmp_path):
  """A record written all but its newline (a write cut short by a full disk, an edit) was kept
  as it was: the resumed run's first line was appended to it, and both read as one non-record
  line, skipped (two points gone from metrics.jsonl, and from `evaluate`'s best-step choice)."""
  from fashion_jax.support import metric_writers  # pylint: disable=g-import-not-at-top
  (tmp_path / "metrics.jsonl").write_text('{"step": 5, "eval_accuracy": 0.5}\n'
                                          '{"step": 10, "eval_accuracy": 0.75}')
  writer = metric_writers.MetricWriter(str(tmp_path), enabled=True)
  assert writer.truncate_after(10) == 0
  writer.write(11, {"train_loss": 0.25})
  writer.close()
  assert [(r["step"], len(r)) for r in metric_writers.read_lines(str(tmp_path))] == [
      (5, 2), (10, 2), (11, 3)]


_BOARD_IN_A_BUCKET = r"""
import os, urllib.request
import numpy as np
from fashion_jax.support import metric_writers
writer = metric_writers.MetricWriter("gs://fj-test/run")
writer.write_image(1, "sample", np.zeros((4, 4, 3), np.uint8))  # (No metrics line: no gcsfs.)
writer.close()
urllib.request.urlopen(os.environ["STORAGE_EMULATOR_HOST"] + "/closed").close()
"""


def test_a_cloud_event_file_is_uploaded_when_it_changed_and_never_after_close(tmp_path):
  """tensorboardX uploads a gs:// event file whole at each flush: 4 times over at close, and
  again when collected at exit, after close (network down: 2 minutes of retries, a traceback
  after the run's error). A stand-in for Cloud Storage's upload API counts them."""
  import http.server  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  seen = []

  class Bucket(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_GET(self):  # pylint: disable=invalid-name
      seen.append(self.path)
      self.send_response(204)
      self.end_headers()

    def do_POST(self):  # pylint: disable=invalid-name
      self.rfile.read(int(self.headers.get("Content-Length", 0)))
      seen.append("upload")
      body = json.dumps({"bucket": "fj-test", "name": "x", "generation": str(len(seen))}).encode()
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bucket)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{server.server_address[1]}"}
  try:
    proc = subprocess.run([sys.executable, "-c", _BOARD_IN_A_BUCKET], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
  finally:
    server.shutdown()
    server.server_close()
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert seen.index("/closed") == len(seen) - 1, seen  # Nothing uploaded after close.
  assert 1 <= seen.count("upload") <= 2, seen  # The first events; the image, if apart.
