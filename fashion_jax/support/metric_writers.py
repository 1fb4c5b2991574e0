"""metrics.jsonl and TensorBoard, written by process 0 only."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading

from absl import logging

import fashion_jax
from fashion_jax.support import storage


def summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without PyTorch.

  tensorboardX imports torch whenever it is installed (to accept its tensors), as on Colab and
  most GPU machines: 1.4 s of every run on the CPU VM (torch 2.13, CPU build), more with a CUDA
  build (2-5 s on the H200 machine), and its libraries' memory, for nothing here. Where nothing
  has imported torch yet, the import inside tensorboardX fails on purpose and it goes on without.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is in place.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]
  return SummaryWriter


def _record(line: str) -> dict | None:
  """A metrics line's record, or None for what is not one: a line cut short by a kill, or
  anything else that is not a JSON object with a whole-number "step"."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  if (not isinstance(record, dict) or not isinstance(record.get("step"), int)
      or isinstance(record["step"], bool)):
    return None
  return record


def _read(path: str) -> str:
  try:
    return storage.read_text(path, errors="replace")  # Stray bytes: that line is skipped.
  except OSError as e:  # Unreadable (permissions), a folder: one line, not a traceback.
    raise storage.unreadable(path, e) from e


def foreign_line(workdir: str) -> str | None:
  """The first line of `<workdir>/metrics.jsonl` that this project did not write (None if all
  are its records; a last line cut short by a kill is one of its own)."""
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return None
  lines = _read(path).splitlines()
  for i, line in enumerate(lines):
    if line.strip() and _record(line) is None:
      try:
        json.loads(line)
      except ValueError:
        if i == len(lines) - 1:
          continue
      return line
  return None


def read_lines(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl` ([] if none); lines that are not one are skipped."""
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  return [r for r in map(_record, _read(path).splitlines()) if r is not None]


class MetricWriter:
  """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard.

  Every line carries `wall_time_s` (seconds since the process started), so
  time-to-accuracy can be read straight off the file.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = storage.join(workdir, "metrics.jsonl")
    self._tb_dir = storage.join(workdir, "tensorboard")
    # Cloud Storage has no append: lines wait here and the file is rewritten at each flush
    # (evaluation, checkpoint, the end), not at every line.
    self._pending = [] if storage.is_url(workdir) else None
    self._tb = None
    self._purge_step = None  # Where a resumed run starts again (see truncate_after).
    self._failed = None  # TensorBoard's writer's error, once it failed (see _abandon_board).
    # Imported now (~0.15 s: not inside the first interval's images/s); the writer, which
    # creates the event file, at the first value: a run refused before it writes anything
    # (a resume with another config) leaves no event file behind.
    self._tb_class = summary_writer_class() if enabled else None

  def _board(self):
    if self._tb is None:
      # Room for many values (the default is 10): see _board_failure.
      self._tb = self._tb_class(self._tb_dir, flush_secs=30, purge_step=self._purge_step,
                                max_queue=1000)
      self._watch_board()
      self._upload_only_news()
    return self._tb

  def _upload_only_news(self) -> None:
    """tensorboardX keeps a gs:// event file whole in memory and uploads all of it at each of
    its flushes: every 30 s with nothing new, 4 times over at close, and once more when collected
    at exit, after close (network down: 2 minutes of retries and a traceback after the run's
    error). It now uploads only when events were added; after close (`_no_more_uploads`), never."""
    self._gcs = getattr(getattr(getattr(getattr(getattr(self._tb, "file_writer", None),
                                                    "event_writer", None), "_ev_writer", None),
                                "_py_recordio_writer", None), "_writer", None)
    if not (hasattr(self._gcs, "blob") and hasattr(self._gcs, "buffer")):
      self._gcs = None  # A local file (or another tensorboardX).
      return
    upload, gcs, uploaded = self._gcs.flush, self._gcs, [0]

    def flush():
      if (size := gcs.buffer.tell()) != uploaded[0]:  # (Events are only ever appended.)
        upload()
        uploaded[0] = size
    gcs.flush = flush

  def _no_more_uploads(self) -> None:
    if getattr(self, "_gcs", None) is not None:
      self._gcs.flush = lambda: None

  def _watch_board(self) -> None:
    """Keeps the error that ends tensorboardX's writer thread (a full disk), for _board_failure.
    Once it had died, the values put in its bounded queue filled it, and the next put waited for
    ever: a run whose disk filled hung (process 0; the others in their collective), and at exit
    too (tensorboardX's atexit close). Its traceback is not printed: the error is reported.
    The hook is taken out again at close (see _unwatch_board)."""
    worker = getattr(getattr(getattr(self._tb, "file_writer", None), "event_writer", None),
                     "_worker", None)  # (tensorboardX 2.6's; another version: not watched.)
    if not isinstance(worker, threading.Thread):
      return
    self._worker, self._worker_error, previous = worker, [], threading.excepthook

    def keep(args):
      if self._worker is not None and args.thread is self._worker:
        self._worker_error.append(args.exc_value)
      else:
        previous(args)
    self._hook, self._previous_hook = keep, previous
    threading.excepthook = keep

  def _unwatch_board(self) -> None:
    """At close: the hook out of threading.excepthook (each run's writer stayed in the chain,
    holding it, for as long as the process lived), or inert where another was set over it."""
    if getattr(self, "_hook", None) is None:
      return
    if threading.excepthook is self._hook:
      threading.excepthook = self._previous_hook
    self._worker = self._hook = None

  def _board_failure(self) -> Exception | None:
    """Why TensorBoard's writer thread has stopped, if it has (not by close)."""
    if self._failed is not None:
      return self._failed
    worker = getattr(self, "_worker", None)
    event_writer = getattr(getattr(self._tb, "file_writer", None), "event_writer", None)
    if worker is None or worker.is_alive() or getattr(event_writer, "_closed", True):
      return None
    return (self._worker_error[0] if self._worker_error
            else RuntimeError(f"TensorBoard's writer of {self._tb_dir} stopped"))

  def _abandon_board(self, error: Exception) -> None:
    """After TensorBoard's writer failed (a full disk): `error` is raised again at each later
    write, and tensorboardX's own close at exit is disarmed: it flushed the same unwritten bytes
    again, a traceback after the one line, and the values queued since the thread died could
    hold the exit in its queue's feeder thread."""
    self._failed = error
    self._no_more_uploads()
    event_writer = getattr(getattr(self._tb, "file_writer", None), "event_writer", None)
    if event_writer is None or not hasattr(event_writer, "_closed"):
      return  # (Another tensorboardX: as it was.)
    with contextlib.suppress(Exception):
      event_writer._event_queue.cancel_join_thread()  # pylint: disable=protected-access
    event_writer._closed = True  # pylint: disable=protected-access

  def truncate_after(self, step: int) -> int:
    """Drops lines past `step` (written after the checkpoint a resumed run restarts from).

    The resumed run writes those steps again, so the file stays one clean
    series. Returns the number of lines dropped. TensorBoard drops them too: the event file
    this run starts tells it to forget earlier files' points from step `step + 1` on (they were
    shown twice, the interrupted attempt's and the resumed run's).
    """
    if self.enabled and self._tb is None and storage.exists(self._tb_dir):
      self._purge_step = step + 1
    if not self.enabled or not storage.exists(self.path):
      return 0
    lines = _read(self.path).splitlines(keepends=True)
    keep = [line for line in lines  # Not a record (a line cut short by a kill...): dropped too.
            if (record := _record(line)) is not None and record["step"] <= step]
    if keep and not keep[-1].endswith("\n"):  # A whole record but its newline (a full disk):
      keep[-1] += "\n"  # the next line was appended to it, and both read as one, skipped.
    if keep != lines:
      storage.write_text(self.path, "".join(keep))
    return len(lines) - len(keep)

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **values, "wall_time_s": round(fashion_jax.seconds_since_start(), 3)}
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v  # JSON has no NaN:
              for k, v in record.items()}  # Python wrote it, JSON.parse and jq refuse it.
    if self._pending is not None:
      self._pending.append(json.dumps(record) + "\n")
    else:
      storage.append_text(self.path, json.dumps(record) + "\n")
    with self._tensorboard_writes():
      for key, value in values.items():
        if isinstance(value, (int, float)) and key not in ("epoch",):
          self._board().add_scalar(key, value, step)

  @contextlib.contextmanager
  def _tensorboard_writes(self):
    """A full disk met by TensorBoard's writer (here, or in its thread before): the one line,
    not its OSError's traceback; another error of its thread is raised here."""
    try:
      if (failure := self._board_failure()) is not None:
        raise failure
      yield
    except OSError as e:
      full = storage.out_of_space(self._tb_dir, e)
      if full is None:
        raise
      if self._failed is None:
        self._abandon_board(full)
      raise full from e

  def write_image(self, step: int, tag: str, image) -> None:
    """An [H, W, 3] uint8 image (e.g. `prediction_grid`'s) as a TensorBoard image."""
    if self.enabled:
      self._board().add_image(tag, image, step, dataformats="HWC")

  def flush(self) -> None:
    if self._pending:
      storage.append_text(self.path, "".join(self._pending))
      self._pending.clear()
    if self._tb is not None:
      with self._tensorboard_writes():
        self._tb.flush()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc_value, _):
    if exc_type is None:
      self.close()
      return
    try:  # Already failing (e.g. the disk is full): that error is the one to report.
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      if str(e) != str(exc_value):  # (Not the same error again: TensorBoard's full disk.)
        logging.warning("closing %s after an error failed too: %s", self.path, e)

  def close(self) -> None:
    try:
      self.flush()
      if self._tb is not None:
        with self._tensorboard_writes():
          self._tb.close()
    finally:
      self._no_more_uploads()
      self._unwatch_board()


def prediction_grid(images, labels, probabilities, class_names, scale: int = 4):
  """A grid of images captioned "predicted p%" over "(true: label)", mistakes in red, as an
  [H, W, 3] uint8 array for TensorBoard.

  Drawn with Pillow, in about 10 ms: the matplotlib figure it replaced (16 subplots, tight
  layout, rendered to PNG) took 0.4-0.6 s per evaluation, 10-20 % of the default config's run.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  n, h, w = images.shape[:3]
  cols = min(n, 8)
  rows = -(-n // cols)
  font = ImageFont.load_default()
  line = font.getbbox("Ag(")[3] + 3
  cell_w, cell_h = max(w * scale, 136) + 8, h * scale + 2 * line + 10
  canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    x0, y0 = i % cols * cell_w, i // cols * cell_h
    pixels = np.clip(images[i], 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    picture = picture.resize((w * scale, h * scale), Image.NEAREST).convert("RGB")
    canvas.paste(picture, (x0 + (cell_w - w * scale) // 2, y0 + 2 * line + 6))
    predicted, label = int(np.argmax(probabilities[i])), int(labels[i])
    color = (0, 0, 0) if predicted == label else (210, 0, 0)
    confidence = 100 * probabilities[i][predicted]
    draw.text((x0 + 4, y0 + 3), f"{class_names[predicted]} {confidence:.0f}%", fill=color,
              font=font)
    draw.text((x0 + 4, y0 + 3 + line), f"(true: {class_names[label]})", fill=color, font=font)
  return np.asarray(canvas)
