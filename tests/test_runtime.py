import subprocess
import sys

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
