"""errors.py: the workdir checks, and the one-line errors for a missing extra."""

import errno
import os
import stat
import sys

import pytest

from fashion_jax.support import errors
from fashion_jax.support import storage
from fashion_jax.support.errors import UserError
from tests.conftest import ROOT, assert_one_line_error, run_module


def test_write_probe_cannot_collide_with_another_container(tmp_path, monkeypatch):
  """Containers sharing a workdir can share pids: a probe named by pid may already exist (here
  as a folder, which cannot be opened for writing). The probe's name is unique instead."""
  monkeypatch.setattr(os, "getpid", lambda: 1)
  os.makedirs(tmp_path / ".write_test_1")
  assert storage.ensure_writable_dir(str(tmp_path), "--workdir") == str(tmp_path)
  assert os.listdir(tmp_path) == [".write_test_1"]  # The probe cleaned up after itself.


def test_unsupported_cloud_workdirs_are_refused_before_anything_is_created(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match=r"s3:// folders are not supported \(gs://bucket/path is\)"):
    storage.ensure_writable_dir("s3://bucket/run", "--workdir")
  for missing in ("gcsfs", "google.cloud.storage"):  # With EPATH_USE_TF=false: no TensorFlow.
    monkeypatch.setenv("EPATH_USE_TF", "false")
    monkeypatch.setattr(storage, "_found", lambda module, m=missing: module != m)
    with pytest.raises(UserError, match=r"needs gcsfs \(or TensorFlow\) and google-cloud-storage "
                       r".*fashion_jax\[gcs\]"):
      storage.ensure_writable_dir("gs://bucket/run", "--workdir")
  assert os.listdir(tmp_path) == []  # No local folder named "s3:" or "gs:".


def test_cloud_storage_goes_through_gcsfs_where_installed_unless_the_user_chose(monkeypatch):
  """etils.epath would take TensorFlow's file system wherever TensorFlow is installed (Colab's GPU
  and CPU runtimes); gcsfs is what the emulator tests run, so it is chosen where it is installed
  (test_cloud runs without EPATH_USE_TF beside TensorFlow). A user's own EPATH_USE_TF stays."""
  monkeypatch.delenv("EPATH_USE_TF", raising=False)  # Restored (or removed again) afterwards.
  monkeypatch.setattr(storage, "_found", lambda module: module != "gcsfs")
  storage.use_gcsfs()
  assert "EPATH_USE_TF" not in os.environ  # No gcsfs: TensorFlow's file system, if any, is left.
  monkeypatch.setattr(storage, "_found", lambda module: True)
  storage.resolve("gs://bucket/run", "--workdir")
  assert os.environ["EPATH_USE_TF"] == "false"
  monkeypatch.setenv("EPATH_USE_TF", "1")
  storage.use_gcsfs()
  assert os.environ["EPATH_USE_TF"] == "1"


def test_require_names_the_extra(monkeypatch):
  errors.require("json", "json", "serve", "this")  # Importable: nothing happens.
  monkeypatch.setitem(sys.modules, "PIL", None)
  with pytest.raises(UserError, match=r"^predict needs Pillow, which is not installed here; "
                     r"install it with pip install 'fashion_jax\[serve\]'"):
    errors.require("PIL", "Pillow", "serve", "predict")


def test_a_file_given_as_a_folder_is_named_so(tmp_path):
  (tmp_path / "a_file").write_text("not a folder")
  with pytest.raises(UserError, match="--workdir .*a_file' is a file, not a folder"):
    storage.ensure_writable_dir(str(tmp_path / "a_file"), "--workdir")


def test_local_writes_are_whole_and_keep_the_umask(tmp_path):
  """storage.write_text replaces a file in one step, with the permissions open() gives (a
  mkstemp file would be 0600: unreadable to the rest of a team sharing the workdir)."""
  path = str(tmp_path / "config.json")
  storage.write_text(path, "first")
  storage.write_text(path, "second")
  storage.append_text(path, " and more")
  umask = os.umask(0)
  os.umask(umask)
  assert storage.read_text(path) == "second and more"
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
  assert os.listdir(tmp_path) == ["config.json"]  # No temporary file left.
  storage.move(str(tmp_path), str(tmp_path.parent / "moved" / "run"))
  assert os.listdir(tmp_path.parent / "moved" / "run") == ["config.json"]


def test_links_are_replaced_and_devices_and_fifos_appended_to(tmp_path):
  """A link is replaced, never written through (its target could be another user's file, planted
  in a shared folder); a FIFO or a path under /dev/ is appended to: replaced by a file, /dev/null
  had become a regular file for every process (as root), and a redirected /dev/stdout lost what
  was printed before."""
  target = tmp_path / "someone_elses.rc"
  target.write_text("theirs")
  (tmp_path / "link.json").symlink_to(target)
  storage.write_text(str(tmp_path / "link.json"), "new")
  assert not (tmp_path / "link.json").is_symlink()
  assert (tmp_path / "link.json").read_text() == "new" and target.read_text() == "theirs"
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
  try:
    storage.write_text(str(fifo), "through the pipe")
    assert os.read(reader, 100) == b"through the pipe"
  finally:
    os.close(reader)
  assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # (Not /dev/null itself: a regression would break it.)
  assert sorted(os.listdir(tmp_path)) == ["fifo", "link.json", "someone_elses.rc"]
  assert storage.written_in_place("/dev/null") and storage.written_in_place("/dev/stdout")
  assert not storage.written_in_place(str(tmp_path / "link.json"))
  (tmp_path / "fifo_link").symlink_to(fifo)
  assert not storage.written_in_place(str(tmp_path / "fifo_link"))  # Replaced like any link.


def test_a_long_file_name_that_fits_is_written(tmp_path):
  """The temporary name does not grow with the file's (a 250-character name plus a suffix passed
  the file system's 255)."""
  path = tmp_path / ("r" * 245 + ".json")
  storage.write_text(str(path), "{}")
  assert path.read_text() == "{}" and os.listdir(tmp_path) == [path.name]


def test_a_full_disk_names_the_fix_the_caller_gives(tmp_path, monkeypatch):
  real_open = open

  def full(file, mode="r", *args, **kwargs):
    if "x" in mode:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr("builtins.open", full)
  with pytest.raises(UserError, match=r"^no space left where .*out.json is written \(No space "
                     r"left on device\); pass another --output$"):
    storage.write_text(str(tmp_path / "out.json"), "{}", full_fix="pass another --output")
  assert os.listdir(tmp_path) == []


_COPIED_CONFIG = '''from fashion_jax import config_lib


def get_config():
  return config_lib.load_sibling(__file__, "default")  # As the shipped configs once did.
'''
_PLANTED = '''import pathlib
pathlib.Path(__file__).with_name("planted_code_ran").touch()
from fashion_jax.default_config import get_config
'''


@pytest.mark.parametrize("folder_mode, file_mode, refused", [
    (0o1777, 0o666, "default.py is writable by its group or others (mode 666; chmod go-w"),
    # No sticky bit: replaceable. The --config file itself is refused first (cli).
    (0o777, 0o644, "CONFIG is writable by its group or others (mode 777"),
    (0o1777, 0o644, None),  # A shared /tmp-like folder, the file this user's alone: loaded.
    # umask 002 (Debian, Ubuntu): group-writable, fine where the group is this user's alone.
    (0o775, 0o664, "PRIVATE_GROUP")])
def test_a_config_does_not_run_a_sibling_others_could_have_written(tmp_path, folder_mode,
                                                                   file_mode, refused):
  """A config copied into a shared folder builds on the default.py beside it: one planted there
  by someone else must not run (config_lib.load_sibling)."""
  shared = tmp_path / "shared"
  shared.mkdir()
  (shared / "myexp.py").write_text(_COPIED_CONFIG)
  (shared / "default.py").write_text(_PLANTED)
  os.chmod(shared / "myexp.py", 0o644)
  os.chmod(shared / "default.py", file_mode)
  os.chmod(shared, folder_mode)
  if refused == "PRIVATE_GROUP":
    from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
    refused = (None if config_lib._private_group(os.getgid())  # pylint: disable=protected-access
               else "CONFIG is writable by its group or others (mode 775")
  proc = run_module("fashion_jax.main", f"--config={shared / 'myexp.py'}",
                    f"--workdir={tmp_path / 'run'}", "--config.batch_size=0")
  if refused and refused.startswith("CONFIG"):
    assert_one_line_error(proc, f"--config={shared / 'myexp.py'} is not run: {shared} "
                          + refused[len("CONFIG "):], "FASHION_JAX_TRUST_WORKDIR=1")
    assert not (shared / "planted_code_ran").exists()
  elif refused:
    assert_one_line_error(proc, f"builds on {shared / 'default.py'}, which is not run", refused,
                          "fashion_jax.default_config")
    assert not (shared / "planted_code_ran").exists()
  else:
    assert_one_line_error(proc, "config.batch_size=0 is invalid")  # Loaded, then validated.
    assert (shared / "planted_code_ran").exists()
  assert not (tmp_path / "run").exists()


def test_a_config_file_others_could_have_written_is_not_run(tmp_path):
  """The project never runs code from a path another user could have written, yet --config ran
  any file: world-writable, or in a folder (or below one) where anyone could swap it in."""
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  shared, mine = tmp_path / "shared", tmp_path / "mine"
  (shared / "sub").mkdir(parents=True)
  mine.mkdir()
  for path in (shared / "sub" / "exp.py", mine / "open.py", mine / "exp.py"):
    path.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n"
                    "from fashion_jax.default_config import get_config\n")
    path.chmod(0o666 if path.name == "open.py" else 0o644)
  os.chmod(shared, 0o777)  # No sticky bit: anyone may rename sub/ away and put theirs.
  os.chmod(shared / "sub", 0o755)
  assert "open.py is writable by its group or others (mode 666" in config_lib.others_could_write(
      str(mine / "open.py"))
  assert f"{shared} is writable by its group or others (mode 777" in (
      config_lib.others_could_write(str(shared / "sub" / "exp.py")))
  assert config_lib.others_could_write(str(mine / "exp.py")) is None
  os.symlink(shared / "sub" / "exp.py", mine / "link.py")  # Its target's folders count.
  assert str(shared) in config_lib.others_could_write(str(mine / "link.py"))
  proc = run_module("fashion_jax.main", f"--config={shared / 'sub' / 'exp.py'}",
                    f"--workdir={tmp_path / 'run'}", "--config.batch_size=0")
  assert_one_line_error(proc, f"--config={shared / 'sub' / 'exp.py'} is not run: {shared} is "
                        "writable by its group or others", "FASHION_JAX_TRUST_WORKDIR=1")
  assert not (tmp_path / "ran").exists() and not (tmp_path / "run").exists()
  (mine / "flags.txt").write_text(f"--config={mine / 'open.py'}\n--config.batch_size=0\n")
  proc = run_module("fashion_jax.main", f"--flagfile={mine / 'flags.txt'}",  # (absl's)
                    f"--workdir={tmp_path / 'run'}")
  assert_one_line_error(proc, f"--config={mine / 'open.py'} is not run: {mine / 'open.py'} is "
                        "writable by its group or others (mode 666")
  assert not (tmp_path / "ran").exists() and not (tmp_path / "run").exists()
  proc = run_module("fashion_jax.main", f"--config={mine / 'open.py'}", f"--workdir={tmp_path / 'run'}",
                    "--config.batch_size=0", env={"FASHION_JAX_TRUST_WORKDIR": "1"})
  assert_one_line_error(proc, "config.batch_size=0 is invalid")  # Trusted: run, then validated.
  assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("module, flags", [
    ("fashion_jax.main", ["--config=configs/tiny.py", "--workdir=/nonexistent/run"]),
    ("fashion_jax.evaluate", ["--workdir=/nonexistent/run"]),
    ("fashion_jax.export", ["--workdir=/nonexistent/run", "--output=/nonexistent/export"]),
    ("fashion_jax.benchmark", ["--config=configs/tiny.py", "--output=/nonexistent/b.json"])])
def test_a_stray_argument_is_one_line(module, flags):
  """A flag without its dashes or an unquoted space: one line and exit 2 (was absl's page of
  flag help and exit 1, the status of a crash), before anything is read or written."""
  proc = run_module(module, *flags, "num_epochs=3")
  assert_one_line_error(proc, "unexpected arguments: num_epochs=3; every setting is a --flag")


@pytest.mark.parametrize("module, flag", [
    ("fashion_jax.main", "--help"), ("fashion_jax.predict", "--helpfull"),
    ("fashion_jax.evaluate", "-?")])
def test_help_is_a_success(module, flag):
  """absl printed the help and exited 1, the status main's docstring gives a crash."""
  proc = run_module(module, flag)
  assert proc.returncode == 0, proc.stderr
  assert "--workdir" in proc.stdout
  assert run_module(module, "--help=false", "--no_such_flag").returncode == 2


@pytest.mark.parametrize("module, flags", [
    ("fashion_jax.main", [f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}"]),
    ("fashion_jax.evaluate", []), ("fashion_jax.predict", ["PHOTO"])])
def test_an_empty_workdir_is_refused_not_taken_for_the_current_folder(tmp_path, module, flags):
  """`--workdir=` (an unset shell variable) trained into the current folder, exit 0."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  photo = Image.new("L", (28, 28), 0)
  photo.paste(255, (8, 4, 20, 24))
  photo.save(tmp_path / "photo.png")
  os.makedirs(tmp_path / "cwd")
  flags = [str(tmp_path / "photo.png") if f == "PHOTO" else f for f in flags]
  proc = run_module(module, *flags, "--workdir=", cwd=str(tmp_path / "cwd"))
  assert_one_line_error(proc, "--workdir is empty; pass a folder")
  assert os.listdir(tmp_path / "cwd") == []


def test_a_group_is_private_only_without_other_members(monkeypatch):
  """Group-writable config files are fine where the group is the user's own (user-private
  groups): not where it lists members, or is another user's primary group."""
  import grp  # pylint: disable=import-outside-toplevel
  import pwd  # pylint: disable=import-outside-toplevel
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  gid, uid = os.getgid(), os.getuid()
  members, users = [], [pwd.struct_passwd(("me", "x", uid, gid, "", "/", "/bin/sh"))]
  monkeypatch.setattr(grp, "getgrgid", lambda g: grp.struct_group(("g", "x", g, members)))
  monkeypatch.setattr(pwd, "getpwall", lambda: users)
  private = config_lib._private_group  # pylint: disable=protected-access
  assert private(gid) and not private(gid + 1)  # Another group than the user's own.
  members.append("someone")
  assert not private(gid)
  members.clear()
  users.append(pwd.struct_passwd(("other", "x", uid + 1, gid, "", "/", "/bin/sh")))
  assert not private(gid)


def test_an_unreachable_cloud_folder_is_one_line(monkeypatch):
  """gcsfs's client errors (no network: aiohttp's ClientConnectorDNSError after its retries) came
  out of the first look at a gs:// workdir as tracebacks."""
  class Unreachable:
    def __getattr__(self, name):
      def fail():
        raise ConnectionError("Cannot connect to host storage.googleapis.com:443")
      return fail
  monkeypatch.setattr(storage, "_epath", lambda path: Unreachable())
  monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # (No name lookup first.)
  for ask in (storage.exists, storage.isdir, storage.isfile):
    with pytest.raises(UserError, match=r"cannot reach gs://b/run \(ConnectionError: Cannot "
                                        r"connect to host .*\); check the network"):
      ask("gs://b/run")


def test_the_shared_lock_goes_on_without_locks_and_takes_another_users_file(tmp_path,
                                                                            monkeypatch, caplog):
  """paths.exclusive (the native build's and the tfds input's lock): flock's ENOLCK (some NFS and
  FUSE mounts) was a traceback; another user's lock file (0644) went unlocked without a word."""
  import fcntl  # pylint: disable=import-outside-toplevel
  import logging  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import paths  # pylint: disable=import-outside-toplevel
  lock = str(tmp_path / ".lock")
  real_open, real_flock, locked = os.open, fcntl.flock, []

  def as_another_user(path, flags, *args):
    if path == lock and flags & (os.O_WRONLY | os.O_RDWR):
      raise PermissionError(errno.EACCES, "Permission denied", path)
    return real_open(path, flags, *args)

  open(lock, "w").close()
  monkeypatch.setattr(os, "open", as_another_user)
  monkeypatch.setattr(fcntl, "flock", lambda f, op: locked.append(op) or real_flock(f, op))
  with paths.exclusive(lock):
    assert locked == [fcntl.LOCK_EX]

  def no_locks(f, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  with caplog.at_level(logging.WARNING), paths.exclusive(lock):
    pass
  assert f"cannot lock {lock} (No locks available): going on without the lock" in caplog.text


@pytest.mark.parametrize("module", ["fashion_jax.main", "fashion_jax.benchmark"])
def test_a_config_that_returns_nothing_is_named_so(tmp_path, module):
  """get_config() without its return: main said "flag --config=None: Flag --config must have a
  value other than None" (the --config it was given, called missing), benchmark a traceback."""
  config = tmp_path / "noreturn.py"
  config.write_text("from fashion_jax import default_config\n\n\ndef get_config():\n"
                    "  config = default_config.get_config()\n  config.batch_size = 8\n")
  proc = run_module(module, f"--config={config}", f"--workdir={tmp_path / 'run'}"
                    if module == "fashion_jax.main" else f"--output={tmp_path / 'b.json'}")
  assert_one_line_error(proc, f"--config={config} did not load as a config (its get_config() "
                        "returned None; is its return statement missing?)")
  assert sorted(os.listdir(tmp_path)) == ["noreturn.py"]


def test_epochs_a_config_overrides_with_steps_are_refused(tmp_path):
  """--config.num_epochs=1 on configs/speedrun_cpu.py (num_train_steps=1170) trained its 2.5
  epochs without a word; with --config.num_train_steps=-1 the epochs count."""
  workdir = f"--workdir={tmp_path / 'run'}"
  proc = run_module("fashion_jax.main", "--config=configs/speedrun_cpu.py", workdir,
                    "--config.num_epochs=1")
  assert_one_line_error(proc, "--config.num_epochs=1 does nothing: --config=configs/speedrun_cpu.py "
                        "sets num_train_steps=1170, which wins; add --config.num_train_steps=-1")
  proc = run_module("fashion_jax.main", "--config=configs/speedrun_cpu.py", workdir,
                    "--config.num_epochs", "1", "--config.num_train_steps=-1",
                    "--config.batch_size=0")
  assert_one_line_error(proc, "config.batch_size=0 is invalid")  # Past the check: validated.
  (tmp_path / "flags.txt").write_text("-config.num_epochs=1\n")  # In a flagfile, one dash.
  proc = run_module("fashion_jax.main", "--config=configs/speedrun_cpu.py", workdir,
                    f"--flagfile={tmp_path / 'flags.txt'}")
  assert_one_line_error(proc, "--config.num_epochs=1 does nothing")
  assert not (tmp_path / "run").exists()


def test_a_config_under_home_is_read_as_the_workdir_is(tmp_path):
  """--workdir=~/fj is the home's fj; --config=~/exp.py (no shell expands a ~ after '=') was
  read as ./~/exp.py: 'No such file or directory; a relative path is read from ...'."""
  (tmp_path / "exp.py").write_text("from fashion_jax.default_config import get_config\n")
  home = {"HOME": str(tmp_path)}
  proc = run_module("fashion_jax.main", "--config=~/exp.py", f"--workdir={tmp_path / 'run'}",
                    "--config.batch_size=0", env=home)
  assert_one_line_error(proc, "config.batch_size=0 is invalid")  # Loaded, then validated.
  proc = run_module("fashion_jax.main", "--config=~/nope.py", f"--workdir={tmp_path / 'run'}",
                    env=home)
  assert_one_line_error(proc, f"--config={tmp_path / 'nope.py'}: cannot read the config file "
                        "(No such file or directory)")


def test_a_config_under_a_tilde_folder_is_checked_where_it_is_read(tmp_path):
  """absl expands no ~ in a flagfile's --config=~/exp.py (nor in -config=~/exp.py): ml_collections
  ran ./~/exp.py, while the check judged the home's exp.py (missing: not judged at all), so a
  0666 file in a folder every user may write ran."""
  cwd, home = tmp_path / "cwd", tmp_path / "home"
  (cwd / "~").mkdir(parents=True)
  home.mkdir()
  planted = cwd / "~" / "exp.py"
  planted.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n"
                     "from fashion_jax.default_config import get_config\n")
  planted.chmod(0o666)
  os.chmod(cwd, 0o777)
  (tmp_path / "flags.txt").write_text("--config=~/exp.py\n")
  env = {"HOME": str(home), "PYTHONPATH": ROOT}
  for given in (f"--flagfile={tmp_path / 'flags.txt'}", "-config=~/exp.py"):
    proc = run_module("fashion_jax.main", given, f"--workdir={tmp_path / 'run'}",
                      "--config.batch_size=0", env=env, cwd=str(cwd))
    assert_one_line_error(proc, "--config=~/exp.py is not run: ", "FASHION_JAX_TRUST_WORKDIR=1")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [
    ("num_train_steps", 10**20), ("log_every_steps", 10**20), ("eval_every_steps", 2**31),
    ("checkpoint_every_steps", 10**20), ("steps_per_dispatch", 10**20), ("warmup_steps", 2**40)])
def test_step_counts_past_the_step_counter_are_refused(tiny_config, key, value):
  """num_train_steps or log_every_steps past 2**63 ended in NumPy's OverflowError traceback (exit
  1) after the data loaded; past 2**31 - 1 the int32 step counter would wrap."""
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  tiny_config[key] = value
  with pytest.raises(UserError, match=rf"^config\.{key}={value} is invalid: [^;]*\(at most "
                     r"2,147,483,647: the step counter is int32\)$"):
    config_lib.validate(tiny_config)


def test_epochs_past_the_step_counter_are_refused(tiny_config):
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  tiny_config.update({"num_train_steps": -1, "num_epochs": 10**17})
  config_lib.validate(tiny_config)  # Its steps are known once the data is: total_steps.
  with pytest.raises(UserError, match=r"^config\.num_epochs=100000000000000000 is "
                     r"375,000,000,000,000,000,000 steps at batch 16, more than the 2,147,483,647"):
    config_lib.total_steps(tiny_config, 60000)
  tiny_config.num_epochs = 5
  assert config_lib.total_steps(tiny_config, 60000) == 5 * 3750


def test_a_distributed_timeout_jax_cannot_take_is_refused(tiny_config):
  """Past int32 jax.distributed refused its argument, and the run blamed the coordinator ('could
  not join the distributed job at ...: check that every process uses the same address')."""
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  tiny_config.distributed_timeout_s = 2**31
  with pytest.raises(UserError, match=r"^config\.distributed_timeout_s=2147483648 is invalid: a "
                     r"positive number of seconds, at most 2,147,483,647$"):
    config_lib.validate(tiny_config)
  tiny_config.distributed_timeout_s = 2**31 - 1  # Joined a one-process job (checked by hand).
  config_lib.validate(tiny_config)


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give files to another user")
def test_a_config_of_the_user_who_owns_fashion_jax_is_run(tmp_path, monkeypatch):
  """A checkout bind-mounted into a container (the host user's files, run as root), or a team's
  group-writable one: its own configs/ were refused as another user's or the group's, though its
  fashion_jax code runs as it is."""
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  checkout = tmp_path / "checkout"
  (checkout / "fashion_jax").mkdir(parents=True)
  (checkout / "configs").mkdir()
  (checkout / "configs" / "default.py").write_text("")
  for path in (checkout, checkout / "fashion_jax", checkout / "configs",
               checkout / "configs" / "default.py"):
    os.chown(path, 65534, 65534)
  config = str(checkout / "configs" / "default.py")
  assert "belongs to another user (uid 65534)" in config_lib.others_could_write(config)
  monkeypatch.setattr(config_lib, "__file__", str(checkout / "fashion_jax" / "config_lib.py"))
  assert config_lib.others_could_write(config) is None
  # A team's checkout (umask 002, a shared group): fashion_jax is as writable as its configs.
  for path in (checkout / "configs", checkout / "configs" / "default.py"):
    os.chown(path, os.getuid(), 65534)
    path.chmod(0o775 if path.is_dir() else 0o664)
  assert "is writable by its group or others" in config_lib.others_could_write(config)
  os.chown(checkout / "fashion_jax", 65534, 65534)
  (checkout / "fashion_jax").chmod(0o775)
  assert config_lib.others_could_write(config) is None


def test_the_config_check_lists_the_users_only_for_a_group_writable_entry(monkeypatch, tmp_path):
  """Whether a group is a user's alone lists every user (pwd.getpwall: a directory service's
  whole list, where it enumerates); it was asked of each folder up to / with this user's group,
  whatever its mode, though only a group-writable entry needs the answer."""
  import pwd  # pylint: disable=import-outside-toplevel
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  config, chain = os.path.join(ROOT, "configs", "tiny.py"), []
  for path in (config, os.path.realpath(config)):
    while path not in chain:
      chain.append(path)
      path = os.path.dirname(path)
  if any(os.stat(path).st_mode & 0o1020 == 0o020 for path in chain):  # (Sticky: not asked.)
    pytest.skip("a group-writable entry on the way to the checkout's configs/ (umask 002)")
  listed = []
  real = pwd.getpwall
  monkeypatch.setattr(pwd, "getpwall", lambda: listed.append(1) or real())
  assert config_lib.others_could_write(config) is None
  assert not listed
  mine = tmp_path / "exp.py"  # Below /tmp (1777: group-writable, but sticky): not asked either.
  mine.write_text("from fashion_jax.default_config import get_config\n")
  assert config_lib.others_could_write(str(mine)) is None
  assert not listed


@pytest.mark.parametrize("module", ["fashion_jax.main", "fashion_jax.benchmark"])
def test_a_flagfile_that_cannot_be_read_is_one_line(tmp_path, module):
  """Defining --config reads the --flagfile files: a missing one (or one a flagfile names) was
  a traceback of ml_collections' and absl's, exit 1, before any command started."""
  (tmp_path / "flags.txt").write_text(f"--flagfile={tmp_path / 'gone.txt'}\n")
  for flagfile in (tmp_path / "missing.txt", tmp_path / "flags.txt"):
    proc = run_module(module, f"--flagfile={flagfile}", f"--workdir={tmp_path / 'run'}")
    missing = "gone.txt" if flagfile.name == "flags.txt" else "missing.txt"
    assert_one_line_error(proc, "Unable to open flagfile: ", "No such file or directory: "
                          f"'{tmp_path / missing}'; pass --flagfile a file of flags")
    assert not (tmp_path / "run").exists()


def test_the_package_names_its_commands():
  """`python -m fashion_jax` was Python's "cannot be directly executed" error."""
  proc = run_module("fashion_jax")
  assert_one_line_error(proc, "name a command, e.g. python -m fashion_jax.main")
  commands = {line.split()[2] for line in proc.stderr.splitlines() if line.startswith("  python")}
  assert commands == {f"fashion_jax.{c}" for c in ("main", "predict", "evaluate", "export",
                                                   "benchmark")}
  for command in commands:  # Each named command runs (its --help).
    assert run_module(command, "--help").returncode == 0, command
  proc = run_module("fashion_jax", "--help")
  assert proc.returncode == 0 and "fashion_jax.predict --workdir=DIR PATH" in proc.stdout
  proc = run_module("fashion_jax", env={"PYTHONOPTIMIZE": "2"})  # -OO: docstrings dropped.
  assert_one_line_error(proc, "name a command, e.g. python -m fashion_jax.main")
  assert "fashion_jax.predict --workdir=DIR PATH" in proc.stderr, proc.stderr


def test_an_unreadable_run_file_names_the_fix_for_its_cause():
  """Every error reading a run's file said 'make it readable by you', a vanished file and an I/O
  error on a network folder too."""
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  denied = storage.unreadable("/r/checkpoints", PermissionError(13, "Permission denied"))
  assert str(denied) == ("cannot read /r/checkpoints (Permission denied); make it readable by "
                         "you, or pass the --workdir of a run you can read")
  gone = storage.unreadable("/r/checkpoints", FileNotFoundError(2, "No such file or directory"))
  assert str(gone) == ("cannot read /r/checkpoints (No such file or directory); check that it is "
                       "there and its storage is reachable, then re-run")
