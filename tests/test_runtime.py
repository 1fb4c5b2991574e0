import os
import subprocess
import sys
import time

import pytest

from fashion_jax.support import runtime
from tests.conftest import ROOT


def test_malloc_tuning_respects_opt_out_and_user_settings():
  assert runtime.malloc_tuning_wanted({}) == (sys.platform.startswith("linux"))
  assert not runtime.malloc_tuning_wanted({"FASHION_JAX_MALLOC": "default"})
  assert not runtime.malloc_tuning_wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})


def test_reexec_sets_tunables_and_keeps_start_time():
  code = ("import os, sys; from fashion_jax import seconds_since_start; from fashion_jax.support import runtime;"
          "runtime.reexec_with_tuned_malloc('tests.print_env')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, env={"PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0, proc.stderr
  if not runtime.malloc_tuning_wanted({}):
    pytest.skip("malloc tuning is for glibc on Linux only: nothing is re-executed here")
  assert "GLIBC_TUNABLES=" + runtime.MALLOC_TUNABLES in proc.stdout
  assert "START=" in proc.stdout and "START=None" not in proc.stdout


def test_reexec_keeps_the_interpreters_options(tmp_path):
  """`python -P` (no current folder on the import path, so a shared folder's .py files are not
  imported), `-s`, `-X utf8` and `-u` hold after the re-exec too (it had dropped them)."""
  if not runtime.malloc_tuning_wanted({}):
    pytest.skip("malloc tuning is for glibc on Linux only: nothing is re-executed here")
  code = ("from fashion_jax.support import runtime;"
          "runtime.reexec_with_tuned_malloc('tests.print_env')")
  for unbuffered in (False, True):
    proc = subprocess.run([sys.executable, "-P", "-s", "-X", "utf8", *(["-u"] if unbuffered else []),
                           "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "GLIBC_TUNABLES=" + runtime.MALLOC_TUNABLES in proc.stdout  # The re-exec ran.
    assert "SAFE_PATH=True NO_USER_SITE=1 UTF8=1" in proc.stdout, proc.stdout
    # `python -u` (logs piped to a file arrive as written) too; it is not among sys.flags.
    assert f"UNBUFFERED={unbuffered}" in proc.stdout, proc.stdout


def _cgroups(tmp_path, proc_lines, files):
  (tmp_path / "cgroup").write_text("".join(line + "\n" for line in proc_lines))
  for name, text in files.items():
    (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "fs" / name).write_text(text + "\n")
  return str(tmp_path / "cgroup"), str(tmp_path / "fs")


@pytest.mark.parametrize("proc_lines, files, cpus", [
    (["0::/"], {"cpu.max": "max 100000"}, None),  # v2, no limit.
    (["0::/"], {"cpu.max": "200000 100000"}, 2.0),  # v2 in a namespace: its cgroup is the root.
    (["0::/kubepods/pod1/c1"], {"kubepods/cpu.max": "400000 100000",  # The smallest on the way.
                                "kubepods/pod1/cpu.max": "150000 100000",
                                "kubepods/pod1/c1/cpu.max": "max 100000"}, 1.5),
    (["0::/docker/abc"], {"cpu.max": "50000 100000"}, 0.5),  # Not under the mount: its root.
    (["4:memory:/x", "3:cpu,cpuacct:/docker/abc"],  # v1.
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
      "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
      "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 3.0),
    (["1:cpu:/"], {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    (["0::/"], {"cpu.max": "garbage"}, None),
    (["1:name=systemd:/", "0::/"], {}, None),  # Nothing to read (this VM's case).
])
def test_the_cgroups_cpu_quota_is_read(tmp_path, proc_lines, files, cpus):
  assert runtime.cpu_quota(*_cgroups(tmp_path, proc_lines, files)) == cpus


def test_a_cpu_quota_below_the_affinity_narrows_it(monkeypatch):
  """XLA sized its threads by the affinity, not the quota: a container limited to 2 CPUs on a
  large host ran a thread per host CPU, throttled in turns. The idlest CPUs are kept: the first
  ones would pile every such process on a node onto the same cores."""
  import os  # pylint: disable=g-import-not-at-top
  affinity, set_to = list(range(8)), []
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity))
  monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: set_to.append(list(cpus)))
  monkeypatch.delenv(runtime.QUOTA_ENV, raising=False)
  busy = iter([dict.fromkeys(affinity, 0), {0: 1, 1: 1, 2: 1, 3: 50, 4: 40, 5: 30, 6: 2, 7: 2}] * 9)
  monkeypatch.setattr(runtime, "_idle_ticks", lambda: next(busy))  # CPUs 0-2 busy (another job's).
  for quota, expected in ((2.0, [3, 4]), (2.5, [3, 4, 5]), (0.2, [3]), (8.0, None), (None, None),
                          (64.0, None)):
    set_to.clear()
    monkeypatch.setattr(runtime, "cpu_quota", lambda q=quota: q)
    said = runtime.fit_to_cpu_quota()
    assert set_to == ([expected] if expected else []), quota
    assert (said is None) == (expected is None)
    if said:
      assert f"allows {quota:g} CPUs of the 8" in said and "FASHION_JAX_CPU_QUOTA=ignore" in said
      assert f"running on CPUs {','.join(map(str, expected))}, the idlest" in said
  monkeypatch.setenv(runtime.QUOTA_ENV, "ignore")
  monkeypatch.setattr(runtime, "cpu_quota", lambda: 1.0)
  assert runtime.fit_to_cpu_quota() is None and set_to == []


def test_cpus_are_chosen_at_random_where_none_is_busier(monkeypatch):
  monkeypatch.setattr(runtime, "_idle_ticks", lambda: dict.fromkeys(range(64), 0))
  chosen = {tuple(runtime._idlest(list(range(64)), 2, sample_s=0)) for _ in range(20)}
  assert len(chosen) > 10  # Not always the first two: a node's processes would share them.
  monkeypatch.setattr(runtime, "_idle_ticks", lambda: (_ for _ in ()).throw(OSError("no /proc")))
  assert len(runtime._idlest(list(range(8)), 3, sample_s=0)) == 3


def test_ctrl_c_that_ends_at_once_removes_the_scratch_folders(tmp_path):
  """Ending at once on Ctrl-C skips every `finally`: the benchmark's compile cache, profile and
  loop folders stayed behind in /tmp."""
  code = f"""
import os, signal, tempfile, time
from fashion_jax.support import runtime
runtime.end_at_once_on_interrupt("interrupted", 130)
folder = runtime.scratch(tempfile.mkdtemp(prefix="fashion_jax_cache_", dir={str(tmp_path)!r}))
open(os.path.join(folder, "entry"), "w").close()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(30)
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 130 and proc.stderr == "fashion_jax: error: interrupted\n", proc.stderr
  assert os.listdir(tmp_path) == []


_ABANDONED = """
import os, signal, subprocess, sys, tempfile, time
from fashion_jax.support import runtime
folder = runtime.scratch(tempfile.mkdtemp(prefix="fashion_jax_work_", dir=sys.argv[2]))
child = subprocess.Popen(["sleep", "60"], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
with open(os.path.join(sys.argv[2], ".pid"), "w") as f:
  f.write(str(child.pid))
os.rename(os.path.join(sys.argv[2], ".pid"), os.path.join(sys.argv[2], "pid"))
runtime.child_group(child)
if sys.argv[1] == "end_at_once":
  runtime.end_at_once_on_interrupt("interrupted", 130)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(30)
else:  # A second Ctrl-C in a single-process training run.
  from fashion_jax.training import stops
  stops._stop_now(signal.SIGINT)
"""


def _sleeping(pid: int) -> bool:
  """Whether `pid` is a live `sleep` (not a zombie, not another process since): /proc's word."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rpartition(")")[2].split()[0]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().startswith(b"sleep") and state != "Z"
  except OSError:
    return False


@pytest.mark.parametrize("how", ["end_at_once", "stop_now"])
def test_ending_at_once_kills_the_child_groups_and_removes_the_scratch(tmp_path, how):
  """A child started in a session of its own (a native build's compiler), which the terminal's
  Ctrl-C does not reach, ran on after `os._exit` (end_at_once_on_interrupt's Ctrl-C, a second
  Ctrl-C in training: `stops._stop_now`), which skips the `finally` that kills it: a hung
  cc1plus ran for ever. Both paths kill the recorded groups and remove the scratch folders."""
  if not os.path.isdir("/proc/self"):
    pytest.skip("no /proc here: whether the child still runs cannot be told")
  pid = None
  try:
    proc = subprocess.run([sys.executable, "-c", _ABANDONED, how, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    pid = int((tmp_path / "pid").read_text())
    assert proc.returncode == 130 and "fashion_jax: error:" in proc.stderr, proc.stderr
    deadline = time.monotonic() + 10
    while _sleeping(pid) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not _sleeping(pid)
    assert os.listdir(tmp_path) == ["pid"]
  finally:
    if pid is not None and _sleeping(pid):
      os.killpg(pid, 9)


def test_ending_at_once_leaves_a_reaped_childs_group_alone(monkeypatch):
  """A child reaped but still recorded (its build waiting for the other part): its id may be
  another process's group by then, which `abandon` had killed with SIGKILL."""
  child = subprocess.Popen(["true"])
  child.wait()
  killed = []
  monkeypatch.setattr(runtime.os, "killpg", lambda pgid, sig: killed.append(pgid))
  runtime.child_group(child)
  try:
    runtime.abandon()
  finally:
    runtime.child_group(child, running=False)
  assert not killed
