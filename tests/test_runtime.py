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
