"""The commands' persistent compilation cache: on for GPU/TPU in the user's own folder, else off."""

import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

from fashion_jax.support import compile_cache
from tests.conftest import ROOT

# Runs in a fresh process (jax's config is per process); prints enable()'s answer, then what jax
# uses, after one compile with the threshold at 0 so that it is written to the cache.
_PROBE = r"""
import json, sys
import jax, jax.numpy as jnp
from fashion_jax.support import compile_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
folder = compile_cache.enable(sys.argv[1])
jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(5)).block_until_ready()
print(json.dumps({"folder": folder, "jax": jax.config.jax_compilation_cache_dir,
                  "max_size": jax.config.jax_compilation_cache_max_size}))
"""


def _probe(backend, cache_root, **env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                          "FASHION_JAX_COMPILE_CACHE")}  # conftest's cache for the suite: not here.
  environ.update(FASHION_JAX_CACHE_DIR=str(cache_root), JAX_PLATFORMS="cpu", **env)
  out = subprocess.run([sys.executable, "-c", _PROBE, backend], cwd=ROOT, env=environ,
                       capture_output=True, text=True, timeout=120, check=True)
  return json.loads(out.stdout.splitlines()[-1]), out.stderr


def test_accelerators_get_a_private_cache_that_compiles_land_in(tmp_path):
  root = tmp_path / "cache"
  got, _ = _probe("gpu", root)
  folder = root / "xla"
  assert got["folder"] == got["jax"] == str(folder)
  assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
  assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
  entries = [p for p in os.listdir(folder) if not p.startswith(".")]
  assert entries, "the compile was not written to the cache"
  # Bounded where jax can evict (it needs filelock for that), else jax's unbounded default.
  has_filelock = importlib.util.find_spec("filelock") is not None
  assert got["max_size"] == (compile_cache.MAX_BYTES if has_filelock else -1)


def test_off_on_cpu_when_opted_out_and_the_users_own_folder_kept(tmp_path):
  root = tmp_path / "cache"
  got, _ = _probe("cpu", root)
  assert got["folder"] is None and got["jax"] is None
  for off in ("0", "false", "Off"):  # (=false and =off had left it on: only 0 turned it off.)
    got, _ = _probe("tpu", root, FASHION_JAX_COMPILE_CACHE=off)
    assert got["folder"] is None and got["jax"] is None, off
  assert not root.exists()
  own = tmp_path / "mine"
  got, _ = _probe("gpu", root, JAX_COMPILATION_CACHE_DIR=str(own))
  assert got["folder"] == got["jax"] == str(own)
  assert not (root / "xla").exists()


def test_a_folder_others_can_write_is_not_used(tmp_path):
  root = tmp_path / "cache"
  (root / "xla").mkdir(parents=True)
  os.chmod(root, 0o777)  # Another user could swap in a compiled program: never loaded.
  got, stderr = _probe("gpu", root)
  assert got["folder"] is None and got["jax"] is None
  assert "not yours alone" in stderr
  assert os.listdir(root / "xla") == []


def test_a_cache_below_a_folder_anyone_may_write_is_not_used(tmp_path):
  """Its own folders were checked from the cache root down, not above it: in a folder every user
  may write (a team's 0777 scratch), anyone could rename the root away and put theirs, with their
  compiled programs, in its place between runs."""
  shared = tmp_path / "shared"
  shared.mkdir()
  os.chmod(shared, 0o777)
  got, stderr = _probe("gpu", shared / "cache")
  assert got["folder"] is None and got["jax"] is None
  assert f"the folder {shared} is writable by every user" in stderr


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a folder to another user")
def test_root_makes_no_folder_of_its_own_in_another_users_cache(tmp_path):
  """Root with a user's HOME (sudo -E) made a root-owned xla/ in that user's cache, which the
  user's runs could then never use (not theirs): no cache for good. Now nothing is made there."""
  root = tmp_path / "cache"
  root.mkdir(mode=0o700)
  os.chown(root, 65534, 65534)
  got, stderr = _probe("gpu", root)
  assert got["folder"] is None and "not yours alone" in stderr
  assert os.listdir(root) == []


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a folder to another user")
def test_a_user_makes_the_cache_in_a_folder_of_another_users_that_lets_them(tmp_path, monkeypatch):
  """Only root, which may write anywhere, is kept from making folders in another user's: a user
  whose HOME is another's but group-writable (OpenShift's arbitrary uid in group 0, a team's
  setgid folder) had been refused the cache its modes let it make: no compilation cache, and
  the native kernels compiled afresh in a temporary folder on every run."""
  from fashion_jax.support import paths  # pylint: disable=import-outside-toplevel
  home = tmp_path / "home"
  home.mkdir()
  os.chown(home, 1001, 0)
  os.chmod(home, 0o775)
  monkeypatch.setattr(paths.os, "getuid", lambda: 1000680000)  # Not root; in the folder's group.
  root = home / ".cache" / "fashion_jax"
  assert paths.make_private_dir(root / "xla", root)
  assert stat.S_IMODE(os.stat(root / "xla").st_mode) == 0o700


def test_without_a_home_folder_the_run_compiles_afresh_and_says_why(tmp_path):
  """HOME unset for a uid without a passwd entry (a container's arbitrary user), no
  FASHION_JAX_CACHE_DIR or XDG_CACHE_HOME: Path.home()'s RuntimeError came out of enable() as a
  traceback on every GPU/TPU run. Now a warning, and no cache."""
  environ = {k: v for k, v in os.environ.items()
             if k not in ("JAX_COMPILATION_CACHE_DIR", "FASHION_JAX_COMPILE_CACHE", "HOME",
                          "FASHION_JAX_CACHE_DIR", "XDG_CACHE_HOME")}
  code = "import os.path; os.path.expanduser = lambda path: path  # No passwd entry.\n" + _PROBE
  out = subprocess.run([sys.executable, "-c", code, "gpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.splitlines()[-1])
  assert got["folder"] is None and not got["jax"], got
  assert "no persistent compilation cache: no folder to cache in" in out.stderr, out.stderr[-2000:]


def test_the_cache_root_ignores_a_relative_xdg_folder_and_names_a_missing_home(monkeypatch,
                                                                               tmp_path):
  """A relative XDG_CACHE_HOME named a folder under the current one (the XDG spec says to ignore
  it); no home at all is one line naming FASHION_JAX_CACHE_DIR (the data download's default
  folder had raised Path.home()'s RuntimeError, a traceback)."""
  from fashion_jax.data import download  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import paths  # pylint: disable=g-import-not-at-top
  from fashion_jax.support.errors import UserError  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("FASHION_JAX_CACHE_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
  assert paths.cache_root() == tmp_path / ".cache" / "fashion_jax"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert paths.cache_root() == tmp_path / "xdg" / "fashion_jax"
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "own"))
  assert paths.cache_root() == tmp_path / "own"
  for name in ("HOME", "XDG_CACHE_HOME", "FASHION_JAX_CACHE_DIR"):
    monkeypatch.delenv(name)
  monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # As for a uid not in passwd.
  with pytest.raises(UserError, match=r"no folder to cache in: .*; set FASHION_JAX_CACHE_DIR="):
    download.default_folder("fashion_mnist")
