"""JAX's persistent compilation cache for the commands, on GPU and TPU, in the user's own folder.

On an accelerator, XLA's compiling (its autotuning included) is most of a short run: on an H200
the default config spent 17 s of its 30 compiling (the train window 10.9 s, the evaluation
6.5 s) and under 2 s training (BENCHMARKS.md). With the cache, running a command again (the
same run resumed, a new workdir, `evaluate` or `predict` after training) loads those programs
from disk; XLA's GPU autotuning results are kept there too, so other batch sizes compile faster.

Where: `$JAX_COMPILATION_CACHE_DIR` (or jax's `jax_compilation_cache_dir`) if the user set one,
else `<cache root>/xla` (`paths.cache_root`: `~/.cache/fashion_jax`). Ours is used only if it
and every folder down from the cache root are this user's alone, and no folder above the root is
one every user may write (`paths.put_by_others`): a cached executable is code.
Capped at `MAX_BYTES` (least recently used entries go) where the `filelock` package that jax
needs for that is installed. `FASHION_JAX_COMPILE_CACHE=0` (false, no, off) turns ours off.

Not on the CPU: compiling takes about 2 s there, and XLA:CPU refuses cached executables it
judges built for other CPU features (jax-ml/jax#38445: on some CPUs every entry, with an error
line each), so the cache would cost more than it saves. Tests and the benchmark, which measure
or count compiles, do not call `enable`.

A job of several processes on the CPU runs with no persistent cache at all, even one the user
set: with jax 0.12.1 its processes deadlock in their first train window's all-reduce (Gloo)
whenever they load their programs from a warm cache (reproduced every time here; two runs
in a row of one 2-process job, the second hangs), which 0.12.0.1 did not. One process loading
is enough: with only process 0 reading the cache (jax writes from process 0 alone, so process 1
compiled afresh) the second run hung too, so no cache at all is the narrowest safe choice.
It is jax's, not this project's: two processes that jit three reductions of one array sharded
over their two CPU devices (gloo collectives, the cache on) finish the first run and hang in the
second on jax 0.12.1, and finish every run on 0.10.2 (BENCHMARKS.md, session 36).
"""

from __future__ import annotations

import importlib.util
import os

from absl import logging
import jax

from fashion_jax.support import paths

ENV = "FASHION_JAX_COMPILE_CACHE"
FOLDER = "xla"
MAX_BYTES = 4 << 30
ACCELERATORS = ("gpu", "tpu")


def enable(backend: str | None = None) -> str | None:
  """Turns the persistent cache on for this process (before its first compile) where it pays, and
  off, even the user's, for a job of several processes on the CPU; returns the folder in use, or
  None."""
  backend = backend or jax.default_backend()
  configured = jax.config.jax_compilation_cache_dir
  if backend == "cpu" and jax.process_count() > 1:  # See above: no cache, not even the user's.
    if configured:
      logging.warning("not using the compilation cache %s: a job of several processes on the "
                      "CPU can deadlock loading its programs from it (jax 0.12.1); each process "
                      "compiles afresh (about 2 s)", configured)
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if configured:  # The user's own choice (JAX_COMPILATION_CACHE_DIR): left as it is.
    return configured
  if paths.turned_off(ENV) or backend not in ACCELERATORS:  # (=false, =off too: only 0 did.)
    return None
  try:
    root = paths.cache_root()
  except paths.NoCacheFolder as e:  # The run goes on, compiling afresh.
    logging.warning("no persistent compilation cache: %s", e)
    return None
  folder = root / FOLDER
  if not paths.make_private_dir(folder, root):
    logging.warning("no persistent compilation cache: %s is not writable or not yours alone "
                    "(another owner, a symlink, or writable by others); every run compiles afresh",
                    folder)
    return None
  try:  # Above the root too: anyone who may write a folder there can swap the root for theirs.
    why = paths.put_by_others(os.path.realpath(root))
  except OSError as e:
    why = f"{root} cannot be looked at ({e.strerror or e})"
  if why:
    logging.warning("no persistent compilation cache in %s: %s; every run compiles afresh (set "
                    "%s to a folder of your own)", folder, why, paths.CACHE_ENV)
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  if importlib.util.find_spec("filelock") is not None:
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  logging.info("compilation cache: %s (%s=0 turns it off)", folder, ENV)
  return str(folder)
