"""SIGTERM/SIGINT during training: save at the current step, exit 75 ("preempted"), resume there."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fashion_jax.training import stops
from tests.conftest import ROOT


# SIGINT takes the same path as SIGTERM; it runs with -m slow (the suite's time budget).
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_saves_and_resumes(tmp_path, idx_dir, sig):
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "fashion_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.idx_dir={idx_dir}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(args + ["--config.num_train_steps=100000"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == stops.EXIT_PREEMPTED == 75, stderr[-3000:]
  message = [l for l in stderr.splitlines() if l.startswith(f"fashion_jax: stopped by {sig.name} at step")]
  assert message, stderr[-3000:]
  stopped_at = int(message[0].split(" at step ")[1].split(";")[0])
  assert (workdir / "checkpoints" / str(stopped_at)).is_dir()  # Durable before exit.

  resumed = subprocess.run(args + [f"--config.num_train_steps={stopped_at + 3}"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from checkpoint at step {stopped_at}" in resumed.stderr
  steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
  assert steps[-1] == stopped_at + 3 and steps == sorted(steps)


def test_signal_before_the_train_loop_stops_at_the_first_boundary(tmp_path, idx_dir):
  """A preemption notice while the run starts (data, restore, compile) is not lost: before,
  the handlers came with the loop, so in a multi-process job jax.distributed's own notifier took
  it and the job trained to the end (exit 0), and a single process died with exit 143.
  The stop step is an evaluation step (not a checkpoint one): its checkpoint keeps the
  validation accuracy, so it competes for "best" (it had been saved without it)."""
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "fashion_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.idx_dir={idx_dir}", "--config.steps_per_dispatch=5",
          "--config.num_train_steps=1000", "--config.eval_every_steps=5",
          "--config.checkpoint_every_steps=1000", "--config.validation_size=64"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", FASHION_JAX_SIGNAL_AT="restored")
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == stops.EXIT_PREEMPTED, proc.stderr[-3000:]
  assert "fashion_jax: stopped by SIGTERM at step 5;" in proc.stderr, proc.stderr[-3000:]
  said = _said_at_the_first(signal.SIGTERM)  # At once, before the compile (it was silent).
  assert proc.stderr.count(said) == 1, proc.stderr[-3000:]
  assert proc.stderr.index(said) < proc.stderr.index("compiled and ran the"), proc.stderr[-3000:]
  saved = json.loads((workdir / "checkpoints" / "5" / "metrics" / "metrics").read_text())
  assert 0 < saved["val_accuracy"] < 1, saved


def test_a_stop_inside_a_log_interval_resumes_to_the_same_log_lines(tmp_path, idx_dir):
  """Stopped at step 5 of a 4-step log interval (steps 5-8), then resumed: the step-8 line sums
  steps 5-8, as the uninterrupted run's does (it had summed only 6-8: the partial interval lived
  in memory; the default config logs every 200 steps and checkpoints every 1,875)."""
  args = [sys.executable, "-m", "fashion_jax.main", "--config=configs/tiny.py",
          f"--config.idx_dir={idx_dir}", "--config.steps_per_dispatch=5",
          "--config.num_train_steps=10", "--config.log_every_steps=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = {}
  for name, signal_at in (("straight", None), ("resumed", "restored"), ("resumed", None)):
    run_env = dict(env, FASHION_JAX_SIGNAL_AT=signal_at) if signal_at else env
    proc = subprocess.run(args + [f"--workdir={tmp_path / name}"], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == (stops.EXIT_PREEMPTED if signal_at else 0), proc.stderr[-3000:]
    runs[name] = [{k: v for k, v in json.loads(line).items()
                   if k not in ("wall_time_s", "train_images_per_sec")}
                  for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in runs["straight"] if "train_loss" in line] == [4, 8, 10]
  assert runs["resumed"] == runs["straight"]


def _signalled_twice(tmp_path, idx_dir, sig, point: str) -> tuple[int, str, list[str]]:
  """A run signalled with `sig` once it logs, and again from inside it at `point`
  (faults.maybe_signal): (exit status, stderr, its `fashion_jax: ` lines)."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "fashion_jax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--config.idx_dir={idx_dir}", "--config.log_every_steps=1",
       "--config.num_train_steps=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env=dict(os.environ, JAX_PLATFORMS="cpu", FASHION_JAX_SIGNAL_AT=f"{point}:{sig.name}"),
      text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  return proc.returncode, stderr, [l for l in stderr.splitlines() if l.startswith("fashion_jax: ")]


def _said_at_the_first(sig) -> str:
  """The line a run's first signal gets at once (it was silent: the stop may be minutes away,
  behind a download or a compile, and a Ctrl-C looked ignored)."""
  return (f"fashion_jax: {sig.name}: stopping at the next window boundary, with a checkpoint "
          f"there (a second {sig.name} stops at once), or at the end if that comes first")


@pytest.mark.parametrize("sig, code, says", [
    (signal.SIGINT, 130, "fashion_jax: error: stopped by a second SIGINT before the stop "
                         "checkpoint was saved"),
    (signal.SIGTERM, 75, "fashion_jax: error: stopped by a second SIGTERM before the stop "
                         "checkpoint was saved")])
def test_a_second_signal_stops_waiting_with_one_line(tmp_path, idx_dir, sig, code, says):
  """The second signal (stop waiting for the stop checkpoint) ended in two tracebacks, 100-150
  lines, exit 130 even after SIGTERM. Now one line; 130 after Ctrl-C, 75 (re-run to resume)
  after SIGTERM. The second signal comes from inside the stop save (faults.maybe_signal), so it
  always lands while the checkpoint is written: the one that raced the save could miss it."""
  returncode, stderr, ours = _signalled_twice(tmp_path, idx_dir, sig, "stop_save")
  assert "Traceback" not in stderr, stderr[-3000:]  # Orbax's, when this raised inside its wait.
  assert len(ours) == 2 and ours[0] == _said_at_the_first(sig), stderr[-3000:]
  assert ours[1].startswith(says), stderr[-3000:]
  assert returncode == code, stderr[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_once_the_stop_checkpoint_is_saved_changes_nothing(tmp_path, idx_dir, sig):
  """A second signal after the stop checkpoint was durable but before train_and_evaluate had
  returned (it waits for its background compiles): exit 130 after Ctrl-C, and a line saying the
  stop checkpoint was not saved, which it was. Now exit 75 and the stop's own line."""
  returncode, stderr, ours = _signalled_twice(tmp_path, idx_dir, sig, "stop_saved")
  assert len(ours) == 3 and ours[0] == _said_at_the_first(sig), stderr[-3000:]
  assert ours[1].startswith(f"fashion_jax: warning: {sig.name} ignored: the stop checkpoint is "
                            "saved"), stderr[-3000:]
  assert ours[2].startswith(f"fashion_jax: stopped by {sig.name} at step "), stderr[-3000:]
  assert returncode == 75 and "Traceback" not in stderr, stderr[-3000:]


def _assert_interrupted_in_one_line(proc):
  assert proc.returncode == 130, proc.stderr
  assert proc.stderr.splitlines() == ["fashion_jax: error: interrupted before it finished; what "
                                      "it had saved stays (a training run resumes from its "
                                      "latest checkpoint when re-run)"], proc.stderr


def test_an_interrupt_outside_training_is_one_line():
  """evaluate, predict, export and benchmark hold no stop handler: Ctrl-C there was a
  traceback. cli.run ends any command's interrupt with one line and 130."""
  code = ("from fashion_jax import cli\n"
          "def main(argv):\n"
          "  raise KeyboardInterrupt\n"
          "cli.run(main)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  _assert_interrupted_in_one_line(proc)


def test_a_signal_while_the_backend_starts_is_taken_not_waited_on():
  """main holds its StopRequest from joining the job, before JAX's backend starts. The first
  signal's handler asked jax.process_count(), which waits for the backend's lock, held by the
  very thread the handler interrupted: a scheduler's SIGTERM while the backend started hung the
  process for good (found by a review). The signal comes from inside the backend's start here."""
  code = ("import os, signal, socket, faulthandler, jax\n"
          "faulthandler.dump_traceback_later(60, exit=True)\n"
          "from jax._src import xla_bridge\n"
          "from fashion_jax.training import stops\n"
          "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
          "jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=1, process_id=0)\n"
          "start = xla_bridge._init_backend\n"
          "def signalled(platform):\n"
          "  os.kill(os.getpid(), signal.SIGTERM)\n"
          "  return start(platform)\n"
          "xla_bridge._init_backend = signalled\n"
          "with stops.StopRequest() as stop:\n"
          "  jax.devices()\n"
          "  print('taken:', stop.signal, stop.agreed(0))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0 and proc.stdout == "taken: SIGTERM SIGTERM\n", proc.stderr[-3000:]
  assert ("fashion_jax: SIGTERM: stopping at the next window boundary, with a checkpoint there "
          "that every process agrees on, or at the end") in proc.stderr


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "benchmark"])
def test_an_interrupt_while_a_command_imports_is_one_line(command):
  """Ctrl-C in the second or so a command imports JAX was a KeyboardInterrupt traceback. Here
  the interrupt comes from the import of the command's module itself (made to raise it)."""
  module = {"benchmark": "fashion_jax.benchmarking.benchmark"}.get(
      command, f"fashion_jax.serving.{command}")
  code = ("import sys, runpy\n"
          "class Interrupt:\n"
          "  def find_spec(self, name, path=None, target=None):\n"
          f"    if name == {module!r}:\n"
          "      raise KeyboardInterrupt\n"
          "sys.meta_path.insert(0, Interrupt())\n"
          f"runpy.run_module('fashion_jax.{command}', run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  _assert_interrupted_in_one_line(proc)


def _holds_its_interrupts(pid: int) -> bool:
  """Whether fashion_jax.main has started (after its malloc re-exec) and put its own Ctrl-C
  handler in place: before that, CPython's own start-up turns Ctrl-C into a traceback, as for
  any Python program, and the re-exec holds it (blocked) for that handler."""
  from fashion_jax.support import runtime  # pylint: disable=import-outside-toplevel
  try:
    environ = open(f"/proc/{pid}/environ", "rb").read()
    status = open(f"/proc/{pid}/status").read()
  except OSError:
    return False
  blocked = int(re.search(r"SigBlk:\s*([0-9a-f]+)", status).group(1), 16)
  caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)
  reexeced = b"GLIBC_TUNABLES" in environ or not runtime.malloc_tuning_wanted()
  sigint = 1 << (signal.SIGINT - 1)
  return reexeced and not blocked & sigint and caught & sigint


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("delay", [0.0, 0.4, 1.0])
def test_an_interrupt_while_training_starts_is_one_line(tmp_path, idx_dir, delay):
  """Ctrl-C in the first second or two, before training holds its signals: as a
  KeyboardInterrupt it met JAX's import and gc callback, which swallowed it (the run trained to
  the end, exit 0), made it an ImportError (exit 1), aborted (134), or it was a traceback."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "fashion_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", f"--config.idx_dir={idx_dir}",
       "--config.num_train_steps=100000"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while not _holds_its_interrupts(proc.pid) and time.monotonic() < deadline:
    time.sleep(0.005)
  time.sleep(delay)  # Into its imports (absl, JAX), its backend's start, validation...
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  if proc.returncode == stops.EXIT_PREEMPTED:  # Training held it already: a saved stop.
    assert "stopped by SIGINT at step" in stderr, stderr[-3000:]  # (Soon, on a fast machine.)
    return
  assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
  ours = [l for l in stderr.splitlines() if l.startswith("fashion_jax: ")]
  assert ours == ["fashion_jax: error: interrupted before it finished; what it had saved stays (a "
                  "training run resumes from its latest checkpoint when re-run)"], stderr[-3000:]


@pytest.mark.parametrize("during", ["evaluation", "checkpoint"])
def test_a_signal_during_an_evaluation_or_checkpoint_stops_at_its_step(tiny_config, tmp_path,
                                                                      monkeypatch, during):
  """A notice that comes while step 10 is evaluated or checkpointed stops the run at step 10 (its
  checkpoint is there): the stop was decided before them, so the run trained another window
  (up to 1,000 steps on an accelerator: a preemption's grace period can end first) and saved
  there. The resumed run ends with each step's lines once."""
  from fashion_jax.support import checkpointing  # pylint: disable=import-outside-toplevel
  from fashion_jax.training import train  # pylint: disable=import-outside-toplevel
  tiny_config.num_train_steps = 40
  owner, name = ((train.Evaluation, "__call__") if during == "evaluation"
                 else (checkpointing.Checkpointer, "save"))
  real, sent = getattr(owner, name), []

  def signalled(self, *args, **kwargs):  # (Evaluation(state, step), Checkpointer.save(step, ...))
    result = real(self, *args, **kwargs)
    if args[1 if during == "evaluation" else 0] == 10 and not sent:  # (A second: exit at once.)
      sent.append(os.kill(os.getpid(), signal.SIGTERM))
    return result

  workdir = tmp_path / "run"
  with monkeypatch.context() as patch:
    patch.setattr(owner, name, signalled)
    with pytest.raises(stops.Preempted, match="stopped by SIGTERM at step 10;"):
      train.train_and_evaluate(tiny_config, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
  train.train_and_evaluate(tiny_config, str(workdir))
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "eval_accuracy" in l] == [10, 20, 30, 40]
  assert [l["step"] for l in lines if "train_loss" in l] == list(range(5, 41, 5))


def test_a_stop_in_process_gives_the_signals_back(tiny_config, tmp_path, monkeypatch):
  """train_and_evaluate called in a notebook's own process, stopped by a signal: once its stop
  checkpoint was saved, SIGINT/SIGTERM must come back as they were (ignored for good, the next
  cell could not be interrupted); under main's own StopRequest, that one takes over saved (a
  signal while the call returned had read as a second one: 'not saved', exit 130)."""
  from fashion_jax.training import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("FASHION_JAX_SIGNAL_AT", "restored")  # SIGTERM before the first window.
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
  with pytest.raises(stops.Preempted, match="stopped by SIGTERM"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "alone"))
  assert {sig: signal.getsignal(sig) for sig in before} == before
  with stops.StopRequest() as outer:
    with pytest.raises(stops.Preempted):
      train.train_and_evaluate(tiny_config, str(tmp_path / "under_main"))
    assert signal.getsignal(signal.SIGINT) == outer._handle  # pylint: disable=protected-access
    assert outer._saved == "saved" and outer.signal is None  # pylint: disable=protected-access
  assert {sig: signal.getsignal(sig) for sig in before} == before


class _BusyStream:
  """A text stream in the middle of its own write, as the one a signal interrupted is."""

  def write(self, text=""):
    del text
    raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

  flush = write


class _Exited(Exception):
  pass


def test_a_signal_during_a_write_to_stderr_is_said_and_still_ends_the_run(capfd, monkeypatch):
  """Python runs a handler between two bytecodes of the code it interrupted, which may be in
  sys.stderr's own write (a progress line, a log line). The second signal's exit wrote its
  line there too: `RuntimeError: reentrant call` went up into that code instead of the exit
  (the run went on, or crashed with a traceback); the handlers' warnings, through logging, were
  lost. The handlers write to the file descriptor instead."""
  def exit_now(code):
    raise _Exited(code)
  monkeypatch.setattr(stops.os, "_exit", exit_now)
  monkeypatch.setattr(stops.runtime, "abandon", lambda: None)
  with stops.StopRequest() as request:
    monkeypatch.setattr(sys, "stderr", _BusyStream())
    monkeypatch.setattr(sys, "stdout", _BusyStream())
    with pytest.raises(_Exited, match="130"):
      stops._stop_now(signal.SIGINT)  # pylint: disable=protected-access
    request.saved(exiting=False)
    request._handle(signal.SIGINT, None)  # pylint: disable=protected-access
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
  err = capfd.readouterr().err
  assert "fashion_jax: error: stopped by a second SIGINT before the stop checkpoint" in err
  assert "fashion_jax: warning: SIGINT ignored: the stop checkpoint is saved" in err
  # A notebook's sys.stderr (its cell's output) is used where it takes the line: fd 2 is the
  # kernel's own, which no one sees.
  cell = io.StringIO()
  monkeypatch.setattr(sys, "stderr", cell)
  request._handle(signal.SIGTERM, None)  # pylint: disable=protected-access
  monkeypatch.setattr(sys, "stderr", sys.__stderr__)
  assert cell.getvalue().startswith("fashion_jax: warning: SIGTERM ignored: the stop checkpoint")
  assert "SIGTERM" not in capfd.readouterr().err
