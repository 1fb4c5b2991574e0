"""The evaluation figures: a confusion matrix and a grid of the most confident mistakes.

Kept apart from `evaluate` so the metrics code does not import matplotlib,
and so the figures can be drawn from any (labels, predictions) a caller has.
Everything renders with the Agg backend: no display is needed (servers, CI,
Colab subprocesses), and the backend is selected on the figure itself rather
than globally, so importing this module does not change the backend of a
notebook that uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _new_figure(width: float, height: float):
  """A Figure on its own Agg canvas (no pyplot, so no global state and no display)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], title: str,
                          path: str, dpi: int = 120) -> None:
  """Counts in every cell, coloured by the row-normalised fraction (the recall of each class).

  Colour by row fraction rather than by count: every true class then uses
  the same scale, so an off-diagonal cell that stands out is a confusion
  that matters for that class, whatever the class sizes are. The counts are
  printed in the cells so nothing has to be read off a colour bar.
  """
  confusion = np.asarray(confusion)
  k = len(class_names)
  rows = confusion.sum(axis=1, keepdims=True)
  fraction = confusion / np.maximum(rows, 1)
  figure = _new_figure(1.2 + 0.8 * k, 1.2 + 0.68 * k)
  ax = figure.add_subplot()
  image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
  colorbar = figure.colorbar(image, ax=ax, shrink=0.85)
  colorbar.set_label("fraction of the true class (row)")
  ax.set_xticks(range(k), labels=class_names, rotation=40, ha="right", rotation_mode="anchor")
  ax.set_yticks(range(k), labels=[f"{name} ({int(n)})" for name, n in zip(class_names, rows[:, 0])])
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class (test images)")
  fontsize = 9 if confusion.max() < 10_000 else 7
  for i in range(k):
    for j in range(k):
      count = int(confusion[i, j])
      if count == 0 and i != j:
        continue  # Empty cells stay blank: the confusions stand out.
      ax.text(j, i, str(count), ha="center", va="center", fontsize=fontsize,
              color="white" if fraction[i, j] > 0.5 else "black")
  ax.set_title(title, fontsize=11)
  figure.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.15)


def plot_mistakes(images: np.ndarray, true_labels: np.ndarray, predicted: np.ndarray,
                  confidence: np.ndarray, indices: np.ndarray, class_names: Sequence[str],
                  title: str, path: str, columns: int = 5, dpi: int = 110,
                  empty: str = "no misclassified test images") -> None:
  """A grid of misclassified images, each titled with true and predicted names and confidence.

  `images` are uint8 [n, 28, 28(, 1)] already chosen and ordered by the
  caller (most confident first); `indices` are their positions in the test
  set (shown as #N), so a mistake can be looked up again. With none to draw the figure says
  `empty` instead of being empty, so the file always exists and is valid.
  """
  n = len(images)
  columns = max(1, min(columns, n))
  rows = max(1, -(-n // columns))
  if n == 0:
    figure = _new_figure(7.0, 2.0)
    figure.text(0.5, 0.45, empty, ha="center", va="center", fontsize=12)
  else:
    figure = _new_figure(1.9 * columns + 0.2, 2.4 * rows + 0.5)
  for i in range(n):
    ax = figure.add_subplot(rows, columns, i + 1)
    # Inverted grey (dark garment on white) reads better on a page; the model saw it as stored.
    ax.imshow(np.asarray(images[i]).reshape(28, 28), cmap="gray_r", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"true: {class_names[int(true_labels[i])]}  #{int(indices[i])}", fontsize=8)
    ax.set_xlabel(f"pred: {class_names[int(predicted[i])]} {100 * float(confidence[i]):.1f}%",
                  fontsize=8, color="#b00000")
  figure.suptitle(title, fontsize=11)
  figure.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.15)
