"""metrics.jsonl and TensorBoard, written by process 0 only."""

from __future__ import annotations

import json
import os

import fashion_jax


def read_lines(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl` ([] if none); a line cut short by a kill is skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return records


class MetricWriter:
  """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard.

  Every line carries `wall_time_s` (seconds since the process started), so
  time-to-accuracy can be read straight off the file.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

  def truncate_after(self, step: int) -> int:
    """Drops lines past `step` (written after the checkpoint a resumed run restarts from).

    The resumed run writes those steps again, so the file stays one clean
    series. Returns the number of lines dropped.
    """
    if not self.enabled or not os.path.exists(self.path):
      return 0
    with open(self.path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if json.loads(line).get("step", 0) <= step:
          keep.append(line)
      except json.JSONDecodeError:  # A line cut short by a kill.
        continue
    if len(keep) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    return len(lines) - len(keep)

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **values, "wall_time_s": round(fashion_jax.seconds_since_start(), 3)}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in values.items():
      if isinstance(value, (int, float)) and key not in ("epoch",):
        self._tb.add_scalar(key, value, step)

  def write_figure(self, step: int, tag: str, figure) -> None:
    """A matplotlib figure as a TensorBoard image (closes the figure)."""
    if self.enabled:
      self._tb.add_figure(tag, figure, step, close=True)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def prediction_figure(images, labels, probabilities, class_names):
  """A grid of images titled "predicted p% / true", mistakes in red: for TensorBoard."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only when samples are written)
  matplotlib.use("Agg")
  from matplotlib import figure as mpl_figure  # pylint: disable=g-import-not-at-top
  n = len(images)
  cols = min(n, 8)
  rows = -(-n // cols)
  fig = mpl_figure.Figure(figsize=(1.6 * cols, 1.9 * rows), dpi=80)
  for i in range(n):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.imshow(images[i].squeeze(), cmap="gray", vmin=0, vmax=255)
    predicted = int(probabilities[i].argmax())
    ok = predicted == int(labels[i])
    ax.set_title(f"{class_names[predicted]} {100 * probabilities[i][predicted]:.0f}%\n"
                 f"(true: {class_names[int(labels[i])]})", fontsize=7,
                 color="black" if ok else "red")
    ax.axis("off")
  fig.tight_layout()
  return fig
