"""Orbax checkpoints of the train state, with a compatibility check on restore.

Each checkpoint holds the whole train state (step, params, optimizer state,
RNG, BatchNorm statistics) and a small JSON description of the model it
belongs to, so restoring into a different model fails with a clear message
instead of a shape error deep inside Orbax.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging as logging_std
import os
import shutil
import sys
import threading
import time
import traceback

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from fashion_jax.support.errors import UserError
from fashion_jax.support import checkpoint_checks
from fashion_jax.support.checkpoint_checks import is_damage  # pylint: disable=unused-import
from fashion_jax.support import faults
from fashion_jax.support import multihost
from fashion_jax.support import storage


ABANDONED_READS_SETTLE_S = 1.0
LISTING_ATTEMPTS = 5  # Listings of the checkpoints that found a step deleted meanwhile: made again.
_CAPTURE_LOCK = threading.Lock()


def first_line(e: BaseException) -> str:
  """An exception's first message line for a one-line error, without the repr of a bound method
  that TensorStore's read errors append ("See full TensorStore details: <bound method ...")."""
  text = str(e).strip()
  first = text.splitlines()[0] if text else type(e).__name__
  return first.split(" See full TensorStore details")[0][:200]


# What the reads abandoned by a failed restore raise where nobody waits for them.
_ABANDONED_READ_ERRORS = ("Event loop is closed", "Encountered error while reading array")


def _is_abandoned_read(exc: BaseException | None, obj=None) -> bool:
  """Whether an exception reported with nobody to catch it comes from an abandoned read."""
  code = getattr(obj, "cr_code", None)  # An Orbax / TensorStore coroutine collected unfinished.
  if code is not None:
    return "/orbax/" in code.co_filename.replace(os.sep, "/") or "tensorstore" in code.co_filename
  return obj is None and exc is not None and any(m in str(exc) for m in _ABANDONED_READ_ERRORS)


class _DropAbandonedReads(logging_std.Filter):
  """asyncio's "Future exception was never retrieved" for an abandoned read, or for a write that
  found the disk full (that error comes back out of the next save or wait, as one line)."""

  def filter(self, record):
    return not (record.exc_info and (_is_abandoned_read(record.exc_info[1])
                                     or checkpoint_checks.out_of_space(record.exc_info[1])))


_stragglers_dropped = False


def _drop_abandoned_read_stragglers() -> None:
  """From a failed restore on (or a training Checkpointer's start: a save that finds the disk full
  abandons its other writes alike), for the rest of the process, drops what an abandoned read reports
  after the settle (a slow machine's straggler: a traceback in the middle of the training log);
  every other unraisable exception or asyncio error is reported as before."""
  global _stragglers_dropped
  if _stragglers_dropped:
    return
  _stragglers_dropped = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable.exc_value, unraisable.object):
      previous(unraisable)

  sys.unraisablehook = hook
  logging_std.getLogger("asyncio").addFilter(_DropAbandonedReads())


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """Keeps what a failed restore leaves behind off the console: when one array of a damaged
  checkpoint cannot be read, Orbax abandons the other reads, and each prints a traceback as it
  is collected (`Exception ignored in: <coroutine ...>`, "Future exception was never retrieved",
  "Event loop is closed": ~1,700 lines for the CNN, which read as a crash although the run falls
  back and trains on). The restore's own exception still propagates, and is what gets reported.
  After a restore that works, whatever was captured (a library's warning) is written out."""
  with _CAPTURE_LOCK:  # The swap is process-wide: one restore at a time.
    real_stderr, real_hook = sys.stderr, sys.excepthook
    asyncio_logger = logging_std.getLogger("asyncio")
    level = asyncio_logger.level
    captured = io.StringIO()
    captured.real_stream = real_stderr  # Where a signal's line goes meanwhile (say_at_once).
    sys.stderr, sys.excepthook = captured, lambda *exc_info: None
    asyncio_logger.setLevel(logging_std.CRITICAL)
    failed = True
    try:
      yield
      failed = False
    except UserError:  # Refused before reading (another model, run or optimizer): no reads.
      failed = False
      raise
    except Exception as e:
      # The abandoned reads finish in TensorStore's threads for a while after the failure, each
      # then reporting its closed event loop: let them. The rest are coroutines that the
      # traceback's finished frames hold: released here and collected, while captured. A read
      # that reports later still is dropped by the hook installed here.
      _drop_abandoned_read_stragglers()
      time.sleep(ABANDONED_READS_SETTLE_S)
      traceback.clear_frames(e.__traceback__)
      gc.collect()
      raise
    finally:
      sys.stderr, sys.excepthook = real_stderr, real_hook
      asyncio_logger.setLevel(level)
      if not failed and captured.getvalue():
        real_stderr.write(captured.getvalue())


def describe_state(model_name: str, state, fingerprint: dict | None = None) -> dict:
  """The JSON stored beside each checkpoint: model name, parameter shapes, and the
  fingerprint of the run (what fixes its data order, schedule and model; see
  train.fingerprint), which a resume must match."""
  shapes = {jax.tree_util.keystr(path): list(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  description = {"model": model_name, "param_shapes": shapes}
  if fingerprint is not None:
    description["fingerprint"] = fingerprint
  return description


BEST_METRIC = "val_accuracy"  # Of the held-out validation split (config.validation_size).
DIGEST = "digest"  # The meta JSON's entry: checkpoint_checks.digest of the saved state.

class _NoMissingMetricWarning(logging_std.Filter):
  """Orbax's warning at each save without metrics once `best_fn` is set: here that is every
  checkpoint of a run without a validation split, or between evaluations; nothing is wrong."""

  def filter(self, record):
    return not str(record.msg).startswith("Requested `tracked_metric`; did not provide metrics")


def _best_metric(metrics) -> float:
  return metrics[BEST_METRIC]


class Checkpointer:
  """Periodic and final saves, keep-N, async writes, restore of the latest step."""

  def __init__(self, directory: str, keep: int, async_save: bool = True, training: bool = False):
    """Keeps the `keep` newest checkpoints, and the one with the best validation accuracy
    (saved with `metrics`) however old it is: what serving picks by default. `training` (the
    workdir's lock held): the temporary folders of saves a kill cut short are removed (a save of
    the same step replaced them, but one at another step stayed; never where serving reads: a
    run may be saving into it)."""
    self.directory = storage.resolve(directory, "checkpoints")
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                  keep_checkpoints_without_metrics=False)])
    # best_fn too: Orbax writes a step's metrics to disk (and reads them back when a resumed run
    # reopens the folder) only with it. With the policy alone they lived in memory, and the first
    # save after a resume deleted the best checkpoint as one without metrics.
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save,
                                           preservation_policy=policy, best_fn=_best_metric,
                                           best_mode="max", cleanup_tmp_directories=training)
    if training:  # A save that finds the disk full abandons its other writes, each reporting
      _drop_abandoned_read_stragglers()  # its closed event loop (~20 tracebacks mid-log).
    absl_logger = logging_std.getLogger("absl")
    for kind in (_NoMissingMetricWarning, checkpoint_checks.QuietOutOfSpace):
      if not any(isinstance(f, kind) for f in absl_logger.filters):
        absl_logger.addFilter(kind())
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()  # (item_handlers= is deprecated)
    for item, args in (("state", ocp.args.StandardSave), ("state", ocp.args.StandardRestore),
                       ("state", ocp.args.PyTreeRestore),  # restore_weights: a part of it.
                       ("meta", ocp.args.JsonSave), ("meta", ocp.args.JsonRestore)):
      handlers.add(item, args)
    before = set(threading.enumerate())
    try:
      self._manager = self._listed(lambda: ocp.CheckpointManager(
          self.directory, options=options, handler_registry=handlers))
    except Exception as e:  # pylint: disable=broad-except  (explained below, else raised as is)
      # Orbax starts removing temporary folders in a thread before it reads the steps: left
      # running, it met an exiting interpreter and printed a traceback under the error line.
      checkpoint_checks.finish_threads(checkpoint_checks.orbax_threads_since(before))
      raise checkpoint_checks.unreadable_metrics(self.directory) or e
    # Opened, only a save waits for that thread, not close: a run ending before its first save
    # (a resume refused, a finished run evaluated again) met the same exit (see close).
    self._opening_threads = checkpoint_checks.orbax_threads_since(before)

  def _listed(self, list_steps):
    """`list_steps()` (Orbax opening the folder, or listing it again), made again where a step it
    listed was gone when it read it: a run still training deletes all but its newest (and best)
    checkpoints, and Orbax's FileNotFoundError for that step read as a checkpoints folder that
    serving could not read. A step that stays missing (or the folder itself) raises as before."""
    for attempt in range(LISTING_ATTEMPTS):
      try:
        return list_steps()
      except FileNotFoundError:
        if attempt == LISTING_ATTEMPTS - 1 or not storage.exists(self.directory):
          raise


  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self, read: bool = False) -> list[int]:
    """The saved steps; `read`: listed from storage again (another process may have saved or
    deleted some since this one opened it)."""
    if read:
      self._listed(self._manager.reload)  # (all_steps(read=True) is deprecated.)
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, description: dict, metrics: dict | None = None) -> None:
    """Starts a save (asynchronous: the device arrays are copied before it returns).

    `metrics`: the evaluation at this step; with BEST_METRIC in it the checkpoint
    competes for "best" (kept beyond the newest `keep`).
    """
    if step in self._manager.all_steps():
      return
    # Agreed: a process that refused alone would leave the others waiting in the collective save.
    try:
      self._check_free_disk(state)
      refusal = None
    except UserError as e:
      refusal = str(e)
    refusals = multihost.gather(f"disk/{step}", refusal)
    if refusals:
      first = min(refusals)
      raise UserError(refusals[first] if first == jax.process_index() else
                      f"process {first}: {refusals[first]}")
    best = {BEST_METRIC: float(metrics[BEST_METRIC])} if metrics and BEST_METRIC in metrics else None
    description = {**description, DIGEST: checkpoint_checks.digest(state)}  # Checked on restore.
    with self._full_disk_is_one_line():  # (The previous asynchronous save's error comes here.)
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(description)), metrics=best,
                         force=True)
    faults.maybe_kill("save", step)  # Tests: SIGKILL while the async write is in progress.

  def _check_free_disk(self, state) -> None:
    if storage.is_url(self.directory):  # Cloud Storage has no "free space" to check.
      return
    needed = 2 * sum(x.nbytes for x in jax.tree.leaves(state)) + (64 << 20)
    free = shutil.disk_usage(self.directory).free
    if faults.disk_full():  # Tests: this process's disk is full.
      free = 0
    if free < needed:
      raise UserError(
          f"not enough free disk to save a checkpoint in {self.directory}: {free >> 20} MB free, "
          f"{needed >> 20} MB needed; free some space (or use another --workdir) and re-run"
          + (f" to resume from the last checkpoint (step {last}), which is intact"
             if (last := self.latest_step()) is not None else " (no checkpoint saved yet)"))

  def meta(self, step: int) -> dict:
    """The JSON saved with `step`'s state: the description, and what else the caller added."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def _check_description(self, step: int, description: dict, serving: bool = False) -> dict:
    """Raises UserError where `step` holds another model or run than `description`'s
    (checkpoint_checks.check_description); returns the JSON saved with it."""
    stored = self.meta(step)
    checkpoint_checks.check_description(storage.join(self.directory, str(step)), stored,
                                        description, serving)
    return stored

  def restore_weights(self, step: int, description: dict) -> dict:
    """What inference needs -- params, batch_stats and their EMAs -- onto the first local device.

    Reads only those entries (the optimizer's state, twice the parameters with Adam, is not
    read), in the structure they were saved with, so the optimizer state of older versions or
    other optimizers does not matter; the model and parameter shapes are checked as in `restore`.
    """
    wanted = ("params", "batch_stats", "ema_params", "ema_batch_stats")
    with _quiet_abandoned_reads():  # The metadata's reads too: a damaged data file fails there.
      stored = self._check_description(step, description, serving=True)
      metadata = self._manager.item_metadata(step)["state"]
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata[key])
                  for key in wanted if key in metadata.keys()}
      state = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          abstract, restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(
              sharding=sharding, global_shape=a.shape, dtype=a.dtype), abstract),
          partial_restore=True))).state
      weights = {key: state.get(key) for key in wanted}
      checkpoint_checks.check_digest(storage.join(self.directory, str(step)), stored.get(DIGEST),
                                     weights, under=wanted)  # (The optimizer's are not served.)
    return weights

  def restore(self, step: int, abstract_state, description: dict):
    """Restores `step` into the structure/shardings of `abstract_state`.

    Raises UserError if the checkpoint belongs to a different model or shape.
    """
    with _quiet_abandoned_reads():  # The metadata's reads too: a damaged data file fails there.
      stored = self._check_description(step, description)
      where = storage.join(self.directory, str(step))
      target = checkpoint_checks.restore_target(
          where, self._manager.item_metadata(step).get("state"), abstract_state)
      state = self._read(step, target)
      if target is not abstract_state:  # Saved without an entry that holds no array here.
        state = abstract_state.replace(**state)
      checkpoint_checks.check_digest(where, stored.get(DIGEST), state)
      return state

  def _read(self, step: int, abstract):
    """Orbax's restore of `step` into `abstract` (inside `_quiet_abandoned_reads`)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract))).state

  def restore_latest(self, abstract_state, description: dict):
    """Restores the newest readable checkpoint: (step, state), or (None, None) if none.

    A checkpoint that is recognisably damaged (truncated, partly written or
    missing files: `is_damage`) on any process, and still is when read again,
    is moved aside to `<workdir>/checkpoints_unreadable/<step>.<time>` --
    never deleted -- with a warning, and the previous one is tried; all
    processes take that decision together. Any other failure to read (a
    transient I/O error, permissions) moves nothing and is an error. A
    checkpoint of another model, shape or run is a UserError, not a fallback;
    so is none left readable where some were moved aside (now or before).
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      state, damage = self._restore_agreed(step, abstract_state, description)
      if damage is None:
        return step, state
      moved = self._quarantine(step)
      logging.warning("checkpoint at step %d is unreadable (%s); moved it to %s and falling back "
                      "to the previous checkpoint", step, damage, moved)
    unreadable = self.directory.rstrip("/") + "_unreadable"
    if storage.exists(unreadable) and storage.has_content(unreadable):  # Not a fresh start: one from scratch would also have
      # emptied the run's metrics, exit 0 (an Orbax that reads its old files no more, a copy
      # that lost a file of every checkpoint): the user decides.
      raise UserError(f"no readable checkpoint in {self.directory}; the unreadable ones are in "
                      f"{unreadable}: delete that folder and re-run to start this run over (its "
                      "metrics too), or use a new --workdir")
    return None, None

  def _restore_agreed(self, step: int, abstract_state, description: dict):
    """(state, None), or (None, why) if `step` is damaged on some process, read twice."""
    for attempt in (1, 2):
      state, outcome = None, None
      try:
        state = self.restore(step, abstract_state, description)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (classified just below)
        # A file it may not read says so (Orbax's error names another cause, or looks like damage).
        blocked = checkpoint_checks.blocked(storage.join(self.directory, str(step)))
        outcome = (f"error: {blocked}" if blocked else ("damage: " if is_damage(e) else "error: ")
                   + f"{type(e).__name__}: {first_line(e)}")
      outcomes = multihost.gather(f"restore/{step}/{attempt}", outcome)
      errors = {i: o for i, o in outcomes.items() if o.startswith("error: ")}
      if errors:
        process = min(errors)
        raise UserError(
            f"checkpoint {storage.join(self.directory, str(step))} could not be read on process "
            f"{process} ({errors[process][len('error: '):]}); that is not recognised damage, so "
            "it is left as it is: check the storage, then re-run to resume")
      if not outcomes:
        return state, None
      if attempt == 1:  # Files still being written by a slow file system: read once more
        # (after the ABANDONED_READS_SETTLE_S the failure waited), not from cached listings.
        storage.forget_listings(self.directory)
        self._manager.reload()
    process = min(outcomes)
    return None, outcomes[process][len("damage: "):] + (
        f" on process {process}" if jax.process_count() > 1 else "")

  def _quarantine(self, step: int) -> str:
    source = storage.join(self.directory, str(step))
    target = storage.join(self.directory.rstrip("/") + "_unreadable", f"{step}.{int(time.time())}")
    if jax.process_index() == 0:
      try:
        storage.move(source, target)
      except OSError as e:
        raise UserError(f"checkpoint {source} is damaged, but it could not be moved aside to "
                        f"{target} ({e.strerror or e}); move or delete it, then re-run to resume "
                        "from the one before it") from e
    multihost.barrier(f"quarantine/{step}")  # Every process sees it gone before going on:
    storage.forget_listings(self.directory)  # not in a listing made before the move.
    self._manager.reload()
    return target

  @contextlib.contextmanager
  def _full_disk_is_one_line(self):
    """An asynchronous save that ran out of space (the check before it cannot see a quota, or
    another process filling the disk meanwhile): a UserError naming the last complete step, not
    Orbax's tracebacks."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless out of space)
      if not checkpoint_checks.out_of_space(e):
        raise
      try:
        storage.forget_listings(self.directory)
        self._manager.reload()
        last = self._manager.latest_step()
      except Exception:  # pylint: disable=broad-except  (the step is a courtesy)
        last = None
      raise UserError(f"no space left to save a checkpoint in {self.directory}; free some space "
                      "(or use another --workdir) and re-run to resume from the last complete "
                      f"checkpoint ({'step ' + str(last) if last is not None else 'none yet'}), "
                      "which is intact") from None

  def wait(self) -> None:
    with self._full_disk_is_one_line():
      self._manager.wait_until_finished()

  def __enter__(self):
    return self

  def __exit__(self, kind, value, tb):
    try:
      self.close()
    except UserError as e:  # A full disk found by the wait: where an error is already on its
      if kind is None:  # way, that one says what happened first (it would hide it).
        raise
      logging.warning("%s", e)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        with self._full_disk_is_one_line():
          self._manager.close()
      finally:
        checkpoint_checks.finish_threads(self._opening_threads)
