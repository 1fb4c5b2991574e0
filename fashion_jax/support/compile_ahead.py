"""Programs compiled ahead, in a background thread, while the train loop runs others."""

from __future__ import annotations

from collections.abc import Callable
import threading

from absl import logging
import jax


class CompiledAhead:
  """A function from `Parallel.compile`, compiled for `args`' shapes in a background thread.

  For a program the loop runs later (the evaluation, the shorter train windows): its compile
  (6.5-8.8 s on an H200, XLA's autotuning; ~0.4-2 s on a CPU) overlaps the train windows
  instead of stalling the loop (a cold default run on the H200: 36.6 -> 33.0 s). The thread
  sees only shapes, dtypes and shardings, never the buffers (the train windows donate them).
  `after`: another one whose compile this one waits for (one compile at a time); `cancel()`
  skips a compile not yet started (a run that ends early waits only for the one running: seven
  queued window lengths had held a stop for 10 s on a CPU, a minute's autotuning on a GPU; one
  that began in the instant before is waited for too).
  Called with arguments of other shapes or types, or ones the compiled program refuses (jax
  0.7's pmap outputs carry another sharding type; it checks before it runs anything), or if
  compiling ahead failed, it calls the function as usual (which compiles, or raises, then;
  `ran_ahead` says which the last call did). The thread is no daemon: a process exiting while
  it compiles waits for it (seconds), as a daemon thread still inside XLA at the interpreter's
  shutdown aborts the process, its exit status lost.
  """

  def __init__(self, fn: Callable, *args, after: CompiledAhead | None = None):
    self._fn, self._compiled, self._after = fn, None, after
    self.cancelled, self.ran_ahead = False, False  # The last call ran the ahead program.
    self._signature = _signature(args)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                       weak_type=x.weak_type), args)
    self._thread = threading.Thread(target=self._compile, args=abstract, daemon=False,
                                    name="fashion_jax-compile-ahead")
    self._thread.start()

  def _compile(self, *abstract) -> None:
    if self._after is not None:
      self._after._thread.join()  # pylint: disable=protected-access
    if self.cancelled:
      return
    try:
      self._compiled = self._fn.lower(*abstract).compile()
    except Exception as e:  # pylint: disable=broad-except  (the first call compiles instead)
      logging.info("compiling ahead failed (%s: %s); the first call compiles instead",
                   type(e).__name__, e)

  @property
  def pending(self) -> bool:  # Still compiling: a call now would wait for it.
    return self._thread.is_alive()

  @property
  def ready(self) -> bool:
    """Whether the ahead-of-time program is compiled and in use (waits for the thread)."""
    self._thread.join()
    return self._compiled is not None

  def cancel(self) -> None:
    self.cancelled = True

  def __call__(self, *args):
    self.ran_ahead = False
    if self.ready and _signature(args) == self._signature:
      try:
        out, self.ran_ahead = self._compiled(*args), True
        return out
      except (TypeError, ValueError) as e:  # Its argument checks: nothing ran.
        logging.info("the program compiled ahead does not take these arguments (%s); "
                     "compiling it for them", e)
        self._compiled = None
    return self._fn(*args)


def _signature(args):
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((x.shape, x.dtype, x.weak_type) for x in leaves)
