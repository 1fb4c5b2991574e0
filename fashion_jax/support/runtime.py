"""Process-level settings that must be in place before the interpreter starts.

XLA:CPU allocates its large temporary and output buffers afresh on every
step. With glibc's default malloc those come from fresh mmaps or trimmed
arenas, so every step page-faults tens of MB again; on the small VMs this
project is benchmarked on that costs more than the arithmetic, and it is why
bigger batches ran *slower* per image. Keeping freed memory in the heap (no
trim, one arena) and backing it with transparent huge pages removes most of
it (numbers in BENCHMARKS.md).

glibc reads these tunables only at process start, so the entry points re-exec
themselves once with `GLIBC_TUNABLES` set. Opt out with
`FASHION_JAX_MALLOC=default`; nothing happens off glibc/Linux or when the user
already set malloc tunables.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time

MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:"
                   "glibc.malloc.mmap_threshold=2000000000:glibc.malloc.trim_threshold=4000000000")
_START_ENV = "FASHION_JAX_PROCESS_START"


def malloc_tuning_wanted(environ=None) -> bool:
  environ = os.environ if environ is None else environ
  if environ.get("FASHION_JAX_MALLOC", "tuned") == "default":
    return False
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  return "glibc.malloc." not in environ.get("GLIBC_TUNABLES", "")


_SCRATCH = set()  # Temporary folders `abandon` removes.
_GROUPS = set()  # Children (Popen) in sessions of their own, whose groups `abandon` kills.


def scratch(folder: str, remove: bool = False) -> str:
  """`folder` (a fresh temporary one, removed by its maker when done), for `abandon` to remove
  too where the process ends at once (the benchmark's compile cache, profile and loop folders
  stayed behind in /tmp). `remove`: its maker is done with it: removed now, and forgotten."""
  if remove:
    shutil.rmtree(folder, ignore_errors=True)
    _SCRATCH.discard(folder)
  else:
    _SCRATCH.add(folder)
  return folder


def child_group(proc: subprocess.Popen, running: bool = True) -> None:
  """Records `proc` (a child started in a session of its own, which the terminal's Ctrl-C does not
  reach) for `abandon` to kill its group while it is not reaped; `running=False`: forgotten."""
  (_GROUPS.add if running else _GROUPS.discard)(proc)


def abandon() -> None:
  """Kills the recorded child groups and removes the scratch folders, for a process about to end
  at once (`os._exit`, which skips every `finally` that does so): a native build's compilers ran
  on without a terminal (a hung cc1plus for ever), their work folder left in the cache."""
  for proc in list(_GROUPS):
    if proc.returncode is None:  # Reaped, its id may be another group's by now: left alone.
      with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
  for folder in list(_SCRATCH):
    shutil.rmtree(folder, ignore_errors=True)


def say_at_once(line: str) -> None:
  """`line` to stderr from a signal handler. A handler runs between two bytecodes of the code it
  interrupted, which may be in sys.stderr's (or stdout's) own write: writing there again raises
  `RuntimeError: reentrant call` from the handler into that code (a crash where a stop or a
  warning was meant). So sys.stderr first (a notebook's cell output, a redirection), and where
  it fails, the file descriptor itself (`os.write`). Stdout's pending lines go first. Not into
  a checkpoint restore's capture of stderr (its `real_stream`): a stop said there came only
  after the restore (minutes from a bucket), or never (a restore that failed)."""
  with contextlib.suppress(Exception):  # (The reentrant call, or a closed stream.)
    sys.stdout.flush()
  try:
    stream = getattr(sys.stderr, "real_stream", sys.stderr)
    stream.write(line + "\n")
    stream.flush()
    return
  except Exception:  # pylint: disable=broad-except
    pass
  data = (line + "\n").encode(errors="replace")
  with contextlib.suppress(OSError):
    while data:
      data = data[os.write(2, data):]


def end_at_once_on_interrupt(message: str, code: int) -> None:
  """From here until a handler of its own takes over (training's stops.StopRequest), Ctrl-C
  prints `fashion_jax: error: MESSAGE` and exits `code` at once. As a KeyboardInterrupt it met
  JAX's import and its gc callback, which swallowed it (the run trained on to exit 0), turned
  it into an ImportError (exit 1) or aborted (134). For a command with nothing saved yet.

  Also takes the Ctrl-C held back over the malloc re-exec (see `reexec_with_tuned_malloc`).
  """
  def end_now(signum, frame):
    del signum, frame
    abandon()
    say_at_once(f"fashion_jax: error: {message}")
    os._exit(code)  # pylint: disable=protected-access

  signal.signal(signal.SIGINT, end_now)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def reexec_with_tuned_malloc(module: str, hold_interrupt: bool = False) -> None:
  """Re-runs `python <same options> -m module <same args>` with the malloc tunables, if wanted.

  Call first thing in an entry point's `__main__`, before JAX is imported.
  The original start time is passed on, so `wall_time_s` still counts from
  the first start.
  """
  if not malloc_tuning_wanted():
    return
  env = dict(os.environ)
  existing = env.get("GLIBC_TUNABLES", "")
  env["GLIBC_TUNABLES"] = f"{existing}:{MALLOC_TUNABLES}" if existing else MALLOC_TUNABLES
  import fashion_jax  # pylint: disable=g-import-not-at-top
  env.setdefault(_START_ENV, repr(fashion_jax.process_start_time()))
  sys.stdout.flush()
  sys.stderr.flush()
  # The interpreter's own options go along: without them `python -P` / `-I` (no current folder on
  # the import path: run from a shared folder, its .py files are not imported), `-E`, `-s`, `-X`
  # and `-W` would hold only until the re-exec. The stdlib's helper is what multiprocessing's
  # spawn uses to start its children with the same options.
  options = subprocess._args_from_interpreter_flags()  # pylint: disable=protected-access
  # `-u` is not among sys.flags, so the helper cannot pass it on; it shows as an unbuffered stdout
  # (a raw FileIO under the text layer). Logs piped to a file or `tee` arrive line by line again.
  if isinstance(getattr(sys.__stdout__, "buffer", None), io.FileIO) and "-u" not in options:
    options.append("-u")
  if hold_interrupt:  # Blocked, a Ctrl-C waits over the exec for end_at_once_on_interrupt (a
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # new Python's default: a traceback).
  try:
    os.execve(sys.executable, [sys.executable, *options, "-m", module, *sys.argv[1:]], env)
  finally:  # Only where the exec failed.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


QUOTA_ENV = "FASHION_JAX_CPU_QUOTA"  # "ignore": run on every CPU of the affinity, quota or not.
CGROUP_ROOT = "/sys/fs/cgroup"


def cpu_quota(proc_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> float | None:
  """How many CPUs this process's cgroup CPU quota allows (a container's `--cpus`, a Kubernetes
  CPU limit), or None where there is none or it cannot be read: the smallest quota along the
  cgroup's path up to the mount's root (cgroup v2's cpu.max, v1's cpu.cfs_quota_us over
  cpu.cfs_period_us). A path missing under the mount (a container that sees its own cgroup as
  the root) is walked up from."""
  try:
    with open(proc_cgroup) as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  quotas = []
  for line in lines:
    _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
    if controllers == "":  # cgroup v2.
      bases, names = [root], ("cpu.max",)
    elif "cpu" in controllers.split(","):
      bases, names = [os.path.join(root, controllers), os.path.join(root, "cpu")], (
          "cpu.cfs_quota_us", "cpu.cfs_period_us")
    else:
      continue
    for base in (b for b in bases if os.path.isdir(b)):
      folder = os.path.join(base, path.lstrip("/"))
      while True:
        try:
          values = [_read_words(os.path.join(folder, n)) for n in names]
          quota, period = values[0] if len(names) == 1 else (values[0][0], values[1][0])
          if quota not in ("max", "-1") and int(period) > 0:
            quotas.append(int(quota) / int(period))
        except (OSError, ValueError, IndexError):
          pass
        if os.path.normpath(folder) == os.path.normpath(base):
          break
        folder = os.path.dirname(folder)
      break
  return min(quotas) if quotas else None


def _read_words(path: str) -> list[str]:
  with open(path) as f:
    return f.read().split()


def _idle_ticks() -> dict[int, int]:
  """Each CPU's idle (and I/O wait) time so far, in clock ticks: /proc/stat's "cpuN" lines."""
  with open("/proc/stat") as f:  # "cpuN user nice system idle iowait ..."
    return {int(fields[0][3:]): int(fields[4]) + int(fields[5]) for fields in map(str.split, f)
            if fields[0].startswith("cpu") and fields[0][3:].isdigit() and len(fields) > 5}


def _idlest(cpus: list[int], count: int, sample_s: float = 0.05) -> list[int]:
  """`count` of `cpus`: those most idle over `sample_s` (/proc/stat's per-CPU idle time), ties
  broken at random. The first ones always would pile every quota-limited process on a node (pods
  with a CPU limit, several commands at once) onto the same cores, where the quota had let them
  spread; at random only where /proc/stat cannot be read."""
  order = random.Random(os.urandom(8))
  try:
    before = _idle_ticks()
    time.sleep(sample_s)
    after = _idle_ticks()
    score = {cpu: after.get(cpu, 0) - before.get(cpu, 0) for cpu in cpus}
  except (OSError, ValueError):
    score = dict.fromkeys(cpus, 0)
  return sorted(sorted(cpus, key=lambda cpu: (-score[cpu], order.random()))[:count])


def fit_to_cpu_quota() -> str | None:
  """Where the cgroup's CPU quota allows fewer CPUs than this process may run on, keeps it (and
  the threads it starts from now on) on that many, the idlest of its affinity, and says so.

  XLA sizes its thread pool by the affinity, not the quota: a container limited to 2 CPUs on a
  64-core host ran 64 threads that the kernel throttled in turns, and the native kernels' threads
  spin while they wait for each other (measured on 2 cores under a 1-CPU quota: 13,500-15,800
  img/s against 16,000-16,500 kept to one CPU). Call before JAX starts its CPU backend.
  `$FASHION_JAX_CPU_QUOTA=ignore` keeps every CPU."""
  if os.environ.get(QUOTA_ENV) == "ignore" or not hasattr(os, "sched_setaffinity"):
    return None
  quota, cpus = cpu_quota(), sorted(os.sched_getaffinity(0))
  if quota is None or (allowed := max(1, math.ceil(quota))) >= len(cpus):
    return None
  chosen = _idlest(cpus, allowed)
  try:
    os.sched_setaffinity(0, chosen)
  except OSError:
    return None
  return (f"the cgroup's CPU quota allows {quota:g} CPUs of the {len(cpus)} this process may run "
          f"on: running on CPUs {','.join(map(str, chosen))}, the idlest (XLA sizes its threads "
          f"by them; {QUOTA_ENV}=ignore keeps all)")
