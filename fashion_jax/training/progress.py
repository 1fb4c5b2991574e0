"""Progress bars on a terminal, nothing otherwise (the log lines carry the same numbers).

A thin layer over tqdm so the train loop does not care whether a bar is shown:
when disabled every method is a no-op. Log lines written while a bar is shown
go through `external_write()` so they do not tear the bar.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time


def wanted(setting: str, is_lead: bool = True) -> bool:
  """config.progress_bar: "on", "off", or "auto" = stderr is a terminal (process 0 only)."""
  if not is_lead or setting == "off":
    return False
  if setting == "on":
    return True
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):  # Closed or replaced stream.
    return False


def fmt_seconds(seconds: float) -> str:
  """An ETA for a log line: "4m05s", "1h02m", "-" when unknown."""
  if not math.isfinite(seconds):
    return "-"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")


def _terminal_columns() -> int:
  try:
    return os.get_terminal_size(sys.stderr.fileno()).columns
  except (AttributeError, OSError, ValueError):
    return 0


class Bar:
  """Counts images; shows images/s, elapsed time and ETA. No-op when not enabled."""

  def __init__(self, enabled: bool, total: int, initial: int = 0, desc: str = "",
               leave: bool = True):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      sized = _terminal_columns() > 0  # Some pseudo-terminals report 0 columns: fixed width.
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="img", unit_scale=True,
                       dynamic_ncols=sized, ncols=None if sized else 100,
                       nrows=None if sized else 24, leave=leave,
                       file=sys.stderr, smoothing=0.1)

  @property
  def count(self) -> int:
    return self._bar.n if self._bar is not None else 0

  @property
  def enabled(self) -> bool:
    return self._bar is not None

  def restart_clock(self) -> None:
    """Rates and ETA from now on (e.g. after compilation, which is not throughput). Not through
    tqdm's reset(): it redraws the bar at 0 before the count is put back, and a resumed run's bar
    (or any after a later window's compile) flashed "0.00/320 [00:00<-00:00, -19.7Mimg/s]"."""
    if self._bar is not None:
      bar = self._bar
      bar.initial = bar.last_print_n = bar.n
      bar.start_t = bar.last_print_t = getattr(bar, "_time", time.time)()
      bar.refresh()

  def update(self, n: int) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def set_postfix(self, **values) -> None:
    if self._bar is not None:
      self._bar.set_postfix(values, refresh=False)

  def external_write(self):
    """Context for log lines: clears the bar, writes, redraws."""
    if self._bar is None:
      return contextlib.nullcontext()
    return self._bar.external_write_mode()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
