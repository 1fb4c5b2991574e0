"""The cluster launchers (TPU pod, SLURM) and the accelerator check, run against stub commands:
what each would execute, its argument checks, and the exit status it passes on."""

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT


def _stub(folder, name, body):
  path = folder / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


@pytest.fixture
def stubs(tmp_path):
  """gcloud runs --command= in bash (the workers' login shell) where git, python3 and pip only
  record their arguments (one JSON list a line); srun records its own; the exit status of a
  worker's `python3 -m fashion_jax.main` is $MAIN_RC."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  record = ('python3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$(basename "$0")" '
            f'"$@" >>{shlex.quote(str(calls))}\n')
  # As ssh does, a worker command killed by a signal comes back as 255 (which gcloud retries).
  # GCLOUD_READS_STDIN: as ssh, it reads its stdin (a terminal: in a background process group,
  # the kernel stops the reader with SIGTTIN).
  _stub(bin_dir, "gcloud", record + '[ -z "${GCLOUD_READS_STDIN:-}" ] || python3 -c "import os\n'
        'os.set_blocking(0, False)\ntry: os.read(0, 1)\nexcept OSError: pass"\n'
        'for a in "$@"; do case $a in --command=*) '
        'cmd=${a#--command=};; esac; done\ncd "$WORKER_HOME" && exec python3 -c "import '
        'subprocess, sys; r = subprocess.run([\'bash\', \'-c\', sys.argv[1]]).returncode; '
        'sys.exit(255 if r < 0 else r)" "$cmd"\n')
  _stub(bin_dir, "srun", record + "exit ${MAIN_RC:-0}\n")
  _stub(bin_dir, "git", record + '[ "$1" != fetch ] || exit ${GIT_FETCH_RC:-0}\n')
  # (local_multiprocess.sh picks a free port with a `-c`: run, not recorded, its answer kept in
  # $WORKER_HOME/port; a line before it, as a $PYTHON that is a wrapper may print.)
  _stub(bin_dir, "fakepython", 'case "$1 $2" in "-c import socket"*) echo "Loading env"\n'
        '  python3 "$@" | tee "$WORKER_HOME/port"; exit;; esac\n' + record + 'if [ "$1 $2" = "-m fashion_jax.main" ]; then\n'
        '  [ -z "${MAIN_SELF_KILL:-}" ] || kill -KILL $$\n'
        '  if [ -n "${MAIN_RUNS:-}" ]; then\n'  # Trains until SIGTERM, then "saves", exit 75.
        '    trap "${MAIN_ON_TERM:-exit 75}" TERM; echo $$ >"$WORKER_HOME/main.pid"\n'
        '    while :; do sleep 0.1; done\n'
        '  fi\n'
        '  exit ${MAIN_RC:-0}\nfi\n[ "$1" != -c ] || exit 0\n')
  # Stops the stand-in above only (a real pkill would reach this machine's other runs).
  _stub(bin_dir, "pkill", record + 'kill "$1" "$(cat "$WORKER_HOME/main.pid")"\n')
  (tmp_path / "worker" / "fashion_jax").mkdir(parents=True)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", WORKER_HOME=str(tmp_path / "worker"),
             TPU_NAME="pod", ZONE="us-central2-b", REPO_URL="https://example.com/fj.git",
             PYTHON="fakepython", SLURM_JOB_ID="42")

  def run(script, *args, cwd=ROOT, **extra):
    # stdin: not the test worker's (pytest-xdist's channel to its workers is their stdin).
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=cwd,
                          env={**env, **extra}, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return proc, [json.loads(l) for l in lines]
  return run


def _main_argv(calls):
  return next(c[3:] for c in calls if c[1:3] == ["-m", "fashion_jax.main"])


def _parses(argv):
  """main's flags parse as given (ml_collections' order rules, the overrides' keys)."""
  code = ("import sys\nfrom absl import flags\nfrom ml_collections import config_flags\n"
          "config_flags.DEFINE_config_file('config')\nflags.DEFINE_string('workdir', '', '')\n"
          "flags.FLAGS(['main'] + sys.argv[1:])\nprint(flags.FLAGS.config.seed)\n")
  proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_tpu_pod_passes_flags_and_paths_to_the_workers_intact(stubs):
  """Flags were pasted unquoted into the workers' shell: JSON lost its quotes and split, a path
  with a space split, and `$`/`;` ran there."""
  flags = ['--config.model_kwargs={"depth": 16, "width": 4}', "--config.note=$HOME;ls"]
  proc, calls = stubs("tpu_pod.sh", "/mnt/shared/my run", *flags, MAIN_RC="75")
  assert proc.returncode == 75, proc.stderr  # The workers' status: stopped, re-run to resume.
  assert _main_argv(calls) == ["--config=configs/default.py", "--workdir=/mnt/shared/my run",
                               "--config.distributed=on", "--config.backend=tpu", *flags]
  assert ["git", "fetch", "--quiet", "origin", "main"] in calls
  pip = next(c for c in calls if c[1:4] == ["-m", "pip", "install"] and "-e" in c)
  assert "-c" in pip  # Installed with the workers' jax, jaxlib and libtpu pinned.
  # A --config among the flags goes first: the script's own --config.KEY before it had been
  # refused by ml_collections ("Found --config.distributed=on in argv before a value for --config").
  proc, calls = stubs("tpu_pod.sh", "gs://bucket/r", "--config.seed=3", "--config=configs/tiny.py",
                      BRANCH="dev")
  assert proc.returncode == 0, proc.stderr
  assert _main_argv(calls) == ["--config=configs/tiny.py", "--workdir=gs://bucket/r",
                               "--config.distributed=on", "--config.backend=tpu", "--config.seed=3"]
  _parses(_main_argv(calls))
  assert ["git", "checkout", "--quiet", "-B", "dev", "FETCH_HEAD"] in calls
  proc, calls = stubs("tpu_pod.sh", "gs://bucket/r", "--config", "configs/tiny.py")
  assert _main_argv(calls)[:2] == ["--config", "configs/tiny.py"]


def test_slurm_script_lets_each_task_see_its_nodes_gpus(stubs):
  """--gpus-per-task=1 showed each task only its own GPU, as number 0, while JAX's SLURM
  detection asks task i for GPU i: 7 of 8 tasks a node could not start on their GPU."""
  script = open(os.path.join(ROOT, "launch", "slurm_multigpu.sbatch")).read()
  assert "#SBATCH --gpus-per-node=8" in script and "--gpus-per-task" not in script.replace(
      "(--gpus-per-task=1", "")
  proc, calls = stubs("slurm_multigpu.sbatch", "/shared/run", '--config.model_kwargs={"depth": 16}',
                      MAIN_RC="75", SLURM_CPUS_PER_TASK="8")
  assert proc.returncode == 75, proc.stderr
  assert calls == [["srun", "--cpus-per-task=8", "fakepython", "-m", "fashion_jax.main",
                    "--config=configs/default.py", "--workdir=/shared/run",
                    "--config.distributed=auto", "--config.parallelism=mesh",
                    "--config.backend=gpu", '--config.model_kwargs={"depth": 16}']]
  proc, calls = stubs("slurm_multigpu.sbatch", "/shared/run", "--config.seed=3",
                      "--config=configs/tiny.py")
  assert proc.returncode == 0, proc.stderr
  argv = calls[0][calls[0].index("fashion_jax.main") + 1:]
  assert argv[0] == "--config=configs/tiny.py" and argv[-1] == "--config.seed=3"
  _parses(argv)


@pytest.mark.parametrize("script, args, says", [
    ("tpu_pod.sh", ["run1"], "WORKDIR=run1: give a gs:// folder or an absolute path"),
    ("tpu_pod.sh", ["--config.num_epochs=1"], "WORKDIR=--config.num_epochs=1: give a gs://"),
    ("tpu_pod.sh", ["s3://bucket/run"], "WORKDIR=s3://bucket/run: give a gs:// folder or an"),
    ("tpu_pod.sh", [], "WORKDIR is missing"),
    ("slurm_multigpu.sbatch", ["--config.num_epochs=1"], "WORKDIR=--config.num_epochs=1: give"),
    ("slurm_multigpu.sbatch", [], "WORKDIR is missing"),
])
def test_cluster_launchers_refuse_bad_arguments_with_exit_2(stubs, script, args, says):
  """Before: a flag in WORKDIR's place became a folder named after it (the override lost), a
  relative path was each worker's own folder; missing ones exited 1 with bash's words."""
  proc, calls = stubs(script, *args)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(f"{script}: error: {says}"), proc.stderr
  assert calls == []  # Nothing was started.


def test_launchers_name_a_missing_setting(stubs, tmp_path):
  proc, _ = stubs("tpu_pod.sh", "/mnt/r", TPU_NAME="")
  assert proc.returncode == 2 and "TPU_NAME is not set" in proc.stderr
  proc, _ = stubs("slurm_multigpu.sbatch", "/shared/run", cwd=tmp_path)  # Not the repo root.
  assert proc.returncode == 2 and "CONFIG=configs/default.py is not a file in" in proc.stderr


def test_cluster_launchers_say_what_is_missing_outside_their_cluster(stubs, tmp_path):
  """Without gcloud, tpu_pod.sh failed with bash's 'gcloud: command not found' (exit 127); the
  SLURM script run by bash (not sbatch) the same for srun, or on a login node with srun, started
  one task there without its #SBATCH settings."""
  import shutil  # pylint: disable=import-outside-toplevel
  bare = tmp_path / "bare"  # A PATH with what the scripts need but no gcloud, srun or git.
  bare.mkdir()
  for tool in ("bash", "dirname", "python3"):
    os.symlink(shutil.which(tool), bare / tool)
  proc, calls = stubs("tpu_pod.sh", "/mnt/r", PATH=str(bare), PYTHON="python3")
  assert proc.returncode == 2 and calls == [], proc.stderr
  assert proc.stderr.startswith("tpu_pod.sh: error: gcloud is not installed"), proc.stderr
  for extra in ({"PATH": str(bare), "PYTHON": "python3"}, {"SLURM_JOB_ID": ""}):
    proc, calls = stubs("slurm_multigpu.sbatch", "/shared/run", **extra)
    assert proc.returncode == 2 and calls == [], proc.stderr
    assert proc.stderr.startswith("slurm_multigpu.sbatch: error: not inside a SLURM job"), (
        proc.stderr)


def test_local_launcher_writes_no_log_through_another_users_link(stubs, tmp_path):
  """The logs were written (truncating) before the processes refused the WORKDIR: in a folder
  every user may write, or another user's (the README's /tmp/fj_mp made first by someone else),
  a link planted as process_0.log had the log overwrite the file it named."""
  victim = tmp_path / "notes.txt"
  victim.write_text("precious")
  shared = tmp_path / "fj_mp"
  shared.mkdir()
  (shared / "process_0.log").symlink_to(victim)
  os.chmod(shared, 0o777)
  proc, calls = stubs("local_multiprocess.sh", "1", "1", str(shared), "--config=configs/tiny.py")
  assert proc.returncode == 2 and calls == [], proc.stderr
  assert proc.stderr.startswith(f"local_multiprocess.sh: error: WORKDIR={shared} is writable by "
                                "every user"), proc.stderr
  if os.getuid() == 0:  # (Only root can give a folder to another user.)
    os.chmod(shared, 0o755)
    os.chown(shared, 65534, 65534)
    proc, calls = stubs("local_multiprocess.sh", "1", "1", str(shared), "--config=configs/tiny.py")
    assert proc.returncode == 2 and calls == [], proc.stderr
    assert f"WORKDIR={shared} belongs to another user" in proc.stderr, proc.stderr
  assert victim.read_text() == "precious"
  trusted = tmp_path / "mount"  # A mount that shows every folder as 0777: the user's word.
  trusted.mkdir(mode=0o777)
  os.chmod(trusted, 0o777)
  proc, calls = stubs("local_multiprocess.sh", "1", "1", str(trusted), "--config=configs/tiny.py",
                      FASHION_JAX_TRUST_WORKDIR="1")
  assert proc.returncode == 0, proc.stderr
  assert _main_argv(calls)[:2] == [f"--workdir={trusted}", "--config=configs/tiny.py"]
  # The coordinator's port: the one the system gave as free (a random one could be in use).
  address = next(a for a in _main_argv(calls) if a.startswith("--config.coordinator_address="))
  assert address.rpartition(":")[2] == (tmp_path / "worker" / "port").read_text().strip()


def test_accelerator_check_refuses_bad_input_with_exit_2(tmp_path, idx_dir):
  """A relative IDX_DIR was read from the repository root, a missing output folder crashed after
  the first stage, a group-writable WHEELS folder was installed from, and a machine without a
  chip was benchmarked on its CPU with exit 0, leaving its empty work folder behind."""
  (tmp_path / "tmp").mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path / "tmp"))
  os.symlink(idx_dir, tmp_path / "fm")
  script = os.path.join(ROOT, "launch", "accelerator_check.sh")

  def check(*args, **extra):
    return subprocess.run(["bash", script, *args], cwd=tmp_path, env={**env, **extra},
                          capture_output=True, text=True, timeout=240)
  (tmp_path / "wheels").mkdir(mode=0o777)
  os.chmod(tmp_path / "wheels", 0o777)
  for args, extra, says in [
      (["fm", "no_such_folder/out.json"], {}, "its folder"),
      (["no_such_idx"], {}, f"--idx_dir='{tmp_path}/no_such_idx' is not a folder"),
      (["fm"], {"WHEELS": "wheels"}, "is not yours alone"),
      (["fm", "a.json", "b.json"], {}, "unexpected argument 'b.json'; usage:"),
      (["fm", "tmp"], {}, f"--output={tmp_path / 'tmp'} is a folder; pass the JSON file's path"),
      (["fm", "out.json"], {"BUDGET_S": "20"}, "--budget_s=20 (BUDGET_S) leaves no time for the"),
      # Options anywhere: `IDX_DIR --allow_cpu` had taken the option for OUTPUT.json.
      (["fm", "--allow_cpu", "out.json", "--no_such_option"], {}, "unrecognized arguments: --no_such_option"),
      (["fm", "out.json"], {}, "JAX found no GPU or TPU (backend: cpu")]:
    proc = check(*args, **extra)
    assert proc.returncode == 2, proc.stderr
    assert "accelerator_check: error: " in proc.stderr and says in proc.stderr, proc.stderr
  assert not (tmp_path / "--allow_cpu").exists()
  assert json.loads((tmp_path / "out.json").read_text())["stages"]["devices"]["backend"] == "cpu"
  assert not list((tmp_path / "tmp").iterdir())


def _wheel(folder, name: str, version: str) -> None:
  """A minimal pure-Python wheel of `name` (its module records the version it came from)."""
  import zipfile  # pylint: disable=import-outside-toplevel
  module = dist = name.replace("-", "_")
  info = f"{dist}-{version}.dist-info"
  files = {f"{module}/__init__.py": f"VERSION = {version!r}\n",
           f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
           f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                            "Tag: py3-none-any\n"}
  files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
  with zipfile.ZipFile(os.path.join(folder, f"{dist}-{version}-py3-none-any.whl"), "w") as z:
    for path, text in files.items():
      z.writestr(path, text)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_accelerator_check_stopped_by_a_signal_stops_its_stage(tmp_path, idx_dir, signum):
  """Each stage runs in a session of its own; SIGTERM/SIGHUP (timeout, a closed ssh session)
  ended the check alone, and the stage went on holding the chip."""
  env = dict(os.environ, TMPDIR=str(tmp_path), JAX_PLATFORMS="cpu")
  check = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "accelerator_check.py"),
                            f"--idx_dir={idx_dir}", f"--output={tmp_path / 'check.json'}",
                            "--allow_cpu"], env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
  stage = f"fashion_jax[.]main .*--workdir={tmp_path}/fashion_jax_accelerator_check_"
  try:
    deadline = time.monotonic() + 120
    while (subprocess.run(["pgrep", "-f", stage], capture_output=True).returncode != 0
           and check.poll() is None and time.monotonic() < deadline):
      time.sleep(0.1)
    check.send_signal(signum)
    _, stderr = check.communicate(timeout=60)
    assert check.returncode == 128 + signum, stderr[-2000:]
    assert f"stopped by {signal.Signals(signum).name}; the stages it finished" in stderr
    assert "devices" in json.loads((tmp_path / "check.json").read_text())["stages"]
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", stage], capture_output=True).returncode == 1
    if signum == signal.SIGHUP:  # Under nohup a hang-up is still ignored (it ended the check).
      (tmp_path / "check.json").unlink(missing_ok=True)
      check = subprocess.Popen(["nohup", sys.executable, os.path.join(ROOT, "launch",
                                "accelerator_check.py"), f"--idx_dir={idx_dir}",
                                f"--output={tmp_path / 'check.json'}", "--allow_cpu"],
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
      while (not (tmp_path / "check.json").exists() and check.poll() is None
             and time.monotonic() < deadline + 60):
        time.sleep(0.1)
      check.send_signal(signal.SIGHUP)
      time.sleep(1)
      assert check.poll() is None, check.communicate()[1][-2000:]
  finally:
    subprocess.run(["pkill", "-KILL", "-f", stage], check=False)
    if check.poll() is None:
      check.kill()
      check.communicate()


def test_accelerator_check_keeps_a_venv_its_wheels_and_relative_options(tmp_path, idx_dir):
  """PYTHON=venv/bin/python was followed to the base interpreter (a link), dropping the venv
  silently; pip took find-links from PIP_FIND_LINKS / pip.conf too, so a folder anyone can write
  won with a higher version over WHEELS; --output=rel.json was written in the repository root."""
  subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=240)
  mine, evil = tmp_path / "mine", tmp_path / "evil"
  for folder, version in ((mine, "1.0"), (evil, "99.0")):
    folder.mkdir()
    os.chmod(folder, 0o755 if folder == mine else 0o777)
    for name in ("ml-collections", "tensorboardX"):
      _wheel(folder, name, version)
  script = os.path.join(ROOT, "launch", "accelerator_check.sh")
  proc = subprocess.run(
      ["bash", script, idx_dir, "--output=rel.json"], cwd=tmp_path, capture_output=True,
      text=True, timeout=240, env=dict(os.environ, PYTHON="venv/bin/python", WHEELS=str(mine),
                                       PIP_FIND_LINKS=str(evil), JAX_PLATFORMS="cpu"))
  # The venv has no JAX: the check says so (it had measured the base interpreter's), naming what
  # it lacks (the two from WHEELS are there).
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert ("a package is missing: jax flax optax orbax.checkpoint; install it, or pass "
          "WHEELS=FOLDER") in proc.stderr, proc.stderr[-2000:]
  version = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c",
                            "import ml_collections, tensorboardX; "
                            "print(ml_collections.VERSION, tensorboardX.VERSION)"],
                           capture_output=True, text=True, check=True).stdout.split()
  assert version == ["1.0", "1.0"]
  proc = subprocess.run(["bash", script, idx_dir, "--output=rel.json"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=240,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and "JAX found no GPU or TPU" in proc.stderr, proc.stderr[-2000:]
  assert (tmp_path / "rel.json").is_file() and not os.path.exists(os.path.join(ROOT, "rel.json"))


def test_local_multiprocess_refuses_a_log_folder_another_launcher_writes(stubs, tmp_path):
  """Two launchers sharing FASHION_JAX_LOG_DIR (two gs:// runs: no workdir lock between them):
  the second truncated the first's process_<i>.log, and the first's summary printed its lines."""
  import fcntl  # pylint: disable=import-outside-toplevel
  logs = tmp_path / "logs"
  logs.mkdir()
  held = os.open(logs, os.O_RDONLY)  # The first launcher, still running, holds the folder.
  try:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    proc, calls = stubs("local_multiprocess.sh", "2", "1", "gs://bucket/run_b",
                        "--config=configs/tiny.py", FASHION_JAX_LOG_DIR=str(logs))
  finally:
    os.close(held)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("local_multiprocess.sh: error: another launcher is writing its "
                                f"processes' logs into {logs}; wait"), proc.stderr
  assert not [c for c in calls if "fashion_jax.main" in c] and not list(logs.glob("process_*"))
  proc, calls = stubs("local_multiprocess.sh", "2", "1", "gs://bucket/run_b",
                      "--config=configs/tiny.py", FASHION_JAX_LOG_DIR=str(logs))
  assert proc.returncode == 0, proc.stderr  # Once it has ended.
  assert len([c for c in calls if "fashion_jax.main" in c]) == 2
  assert sorted(os.listdir(logs)) == ["process_0.log", "process_1.log"]  # No lock file left.


_SIGINT_DEFAULT = ("import os, signal, sys\nsignal.signal(signal.SIGINT, signal.SIG_DFL)\n"
                   "os.execvp(sys.argv[1], sys.argv[1:])")


def test_tpu_pod_stops_the_workers_at_a_common_step_and_passes_on_a_signal_death(stubs, tmp_path):
  """Ctrl-C killed the local ssh sessions only (no terminal on the workers): training went on
  everywhere. A worker killed by a signal made ssh exit 255 (the workers' shell had exec'd
  Python), which gcloud retries: the whole command, 10 times."""
  proc, _ = stubs("tpu_pod.sh", "/mnt/r", MAIN_SELF_KILL="1")
  assert proc.returncode == 137, proc.stderr  # 128 + SIGKILL, from the workers' shell; not 255.
  bin_dir = tmp_path / "bin"  # The fixture's stubs, run here in the background to be signalled.
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", WORKER_HOME=str(tmp_path / "worker"),
             TPU_NAME="pod", ZONE="z", REPO_URL="https://example.com/fj.git", PYTHON="fakepython",
             MAIN_RUNS="1")
  # SIGINT as a terminal's shell gives it: a test run started in the background (`pytest &` in a
  # script, no job control) passes it on ignored, and bash cannot trap a signal ignored on entry.
  # (Reset by a Python that execs bash, not by a preexec_fn: that forks a threaded process.)
  launcher = subprocess.Popen([sys.executable, "-c", _SIGINT_DEFAULT, "bash",
                               os.path.join(ROOT, "launch", "tpu_pod.sh"), "/mnt/r"],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True)
  pid_file = tmp_path / "worker" / "main.pid"
  deadline = time.monotonic() + 60
  try:
    while not pid_file.exists() and time.monotonic() < deadline:
      time.sleep(0.1)
    os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C: the terminal's whole foreground group.
    _, stderr = launcher.communicate(timeout=60)
  finally:  # Out of time: its whole session goes (gcloud's stand-in runs in a group of its own).
    if launcher.poll() is None:
      subprocess.run([shutil.which("pkill") or "pkill", "-KILL", "-s", str(launcher.pid)],
                     check=False)
      launcher.communicate(timeout=30)
  assert launcher.returncode == 75, stderr  # The workers saved: re-run to resume.
  assert "stopping the workers at a common step" in stderr
  calls = [json.loads(l) for l in (tmp_path / "calls").read_text().splitlines()]
  [pkill] = [c for c in calls if c[0] == "pkill"]
  pattern = pkill[-1]
  assert pkill[:5] == ["pkill", "-TERM", "-u", os.environ.get("USER", ""), "-f"]
  for line, matches in (("/usr/bin/python3.11 -u -m fashion_jax.main --workdir=/r", True),
                        # The malloc re-exec under PYTHONDEVMODE=1 / -W: options with a value.
                        ("/usr/bin/python3 -B -Werror -X dev -m fashion_jax.main", True),
                        ("python3 -W error -X importtime -u -m fashion_jax.main", True),
                        ("python3 -m fashion_jax.main --workdir=/r", True),
                        ("bash -c cd fashion_jax && python3 -m fashion_jax.main; exit $?", False)):
    found = subprocess.run(["grep", "-Eq", pattern], input=line, text=True).returncode == 0
    assert found == matches, (pattern, line)


def test_tpu_pod_a_fetch_that_fails_stops_before_training(stubs):
  """`git fetch ... && git checkout ...` under set -e: a failed fetch (a mistyped BRANCH, a
  network blip on one worker) skipped the checkout, and the workers trained the old code."""
  proc, calls = stubs("tpu_pod.sh", "/mnt/r", BRANCH="no-such-branch", GIT_FETCH_RC="128")
  assert proc.returncode == 128, proc.stderr
  assert ["git", "fetch", "--quiet", "origin", "no-such-branch"] in calls
  assert not [c for c in calls if c[:2] == ["git", "checkout"] or "fashion_jax.main" in c]


def test_tpu_pod_a_second_signal_stops_hung_workers_at_once(stubs, tmp_path):
  """After the first Ctrl-C the script ignored INT, TERM and HUP for good: a worker that did not
  stop (hung, or the stop's ssh failed) left only kill -9 from another terminal."""
  stubs("tpu_pod.sh", "/mnt/r")  # (Makes the stubs.)
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", TPU_NAME="pod", ZONE="z",
             WORKER_HOME=str(tmp_path / "worker"), REPO_URL="https://example.com/fj.git",
             PYTHON="fakepython", MAIN_RUNS="1", MAIN_ON_TERM=":")  # Ignores the stop's TERM.
  launcher = subprocess.Popen([sys.executable, "-c", _SIGINT_DEFAULT, "bash",
                               os.path.join(ROOT, "launch", "tpu_pod.sh"), "/mnt/r"],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True)
  pid_file, calls = tmp_path / "worker" / "main.pid", tmp_path / "calls"
  deadline = time.monotonic() + 60

  def pkills():  # The signals the workers' pkill sent (not gcloud's line naming it).
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [c[1] for c in map(json.loads, lines) if c[0] == "pkill"]
  try:
    while not pid_file.exists() and time.monotonic() < deadline:
      time.sleep(0.1)
    os.killpg(launcher.pid, signal.SIGINT)
    while pkills() != ["-TERM"] and time.monotonic() < deadline:  # Delivered (and ignored).
      time.sleep(0.1)
    os.killpg(launcher.pid, signal.SIGHUP)  # A hang-up meanwhile: the stop under way goes on.
    time.sleep(0.5)
    assert launcher.poll() is None and pkills() == ["-TERM"]
    os.killpg(launcher.pid, signal.SIGINT)
    _, stderr = launcher.communicate(timeout=60)
    while pkills() != ["-TERM", "-KILL"] and time.monotonic() < deadline:  # (In the background.)
      time.sleep(0.1)
  finally:
    if launcher.poll() is None:
      subprocess.run([shutil.which("pkill") or "pkill", "-KILL", "-s", str(launcher.pid)],
                     check=False)
      launcher.communicate(timeout=30)
  assert launcher.returncode == 137, stderr
  assert "stopping the workers at once (SIGKILL, no checkpoint" in stderr
  assert pkills() == ["-TERM", "-KILL"]
  state = pathlib.Path(f"/proc/{pid_file.read_text().strip()}/stat")
  assert not state.exists() or state.read_text().split(") ")[1][0] == "Z"  # Gone.


_ON_A_TERMINAL = """import os, pty, signal, sys, time
pid, fd = pty.fork()  # A session of its own whose controlling terminal is the pty: a user's shell.
if pid == 0:
  os.execvp(sys.argv[1], sys.argv[1:])
os.set_blocking(fd, False)
deadline, output = time.monotonic() + 60, b""
while True:
  try:
    output += os.read(fd, 4096)
  except BlockingIOError:
    time.sleep(0.05)
  except OSError:  # (EIO: the session's last process closed the terminal.)
    pass
  done, status = os.waitpid(pid, os.WNOHANG)
  if done:
    break
  if time.monotonic() > deadline:  # Hung: its stopped jobs go with the session (SIGHUP).
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    sys.stdout.write(output.decode(errors="replace"))
    sys.exit(124)
sys.stdout.write(output.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_tpu_pod_runs_from_a_terminal(stubs, tmp_path):
  """Run from a user's terminal, the training session (a process group of its own, so that Ctrl-C
  reaches the script alone) kept the terminal as its stdin: ssh reads it, and the kernel stopped
  gcloud there (SIGTTIN), so the workers never started and the script waited for ever."""
  bin_dir = tmp_path / "bin"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", WORKER_HOME=str(tmp_path / "worker"),
             TPU_NAME="pod", ZONE="z", REPO_URL="https://example.com/fj.git", PYTHON="fakepython",
             MAIN_RC="75", GCLOUD_READS_STDIN="1")
  proc = subprocess.run([sys.executable, "-c", _ON_A_TERMINAL, "bash",
                         os.path.join(ROOT, "launch", "tpu_pod.sh"), "/mnt/r"], env=env,
                        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
  assert proc.returncode == 75, proc.stdout[-2000:]  # The workers' status, not 124 (hung).
  calls = [json.loads(l) for l in (tmp_path / "calls").read_text().splitlines()]
  assert any(c[1:3] == ["-m", "fashion_jax.main"] for c in calls)
