"""Which platform JAX runs on -- and no silent CPU fallback on a machine with an accelerator.

When JAX cannot start a GPU or TPU backend it runs on the CPU with one easily
missed warning: a CUDA plugin whose version no longer matches jaxlib (an
install upgraded jax), libtpu not matching jax, or a TPU already held by
another process (on Colab: the notebook's own kernel, once it has imported
JAX). Training then runs 10-100x slower and looks fine. `check` compares the
platform JAX started with the hardware the machine has (device files), says
loudly what is wrong and the likely cause, and with `config.backend=gpu|tpu`
makes the mismatch an error. `config.backend=cpu` runs on the CPU on purpose.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import re
import sys

from absl import logging

from fashion_jax.support.errors import UserError

BACKENDS = ("auto", "cpu", "gpu", "tpu")
CUDA_PLUGINS = ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt")


def request(backend: str, deterministic: bool = False) -> None:
  """Before JAX starts its backends: `cpu` keeps JAX off any accelerator; `deterministic`
  (config.deterministic) asks XLA for deterministic GPU ops (read when the backend starts)."""
  if deterministic:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_deterministic_ops=true").strip()
  if backend == "cpu":
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")


def accelerators(root: str = "/") -> dict[str, str]:
  """{"gpu" | "tpu": evidence} for the accelerators this machine's device files show."""
  found = {}
  gpus = (sorted(glob.glob(os.path.join(root, "proc/driver/nvidia/gpus/*")))
          or sorted(glob.glob(os.path.join(root, "dev/nvidia[0-9]*"))))
  if gpus:
    found["gpu"] = f"{len(gpus)} NVIDIA GPU(s) ({gpus[0][len(root.rstrip('/')):]})"
  tpus = (sorted(glob.glob(os.path.join(root, "dev/accel[0-9]*")))
          or sorted(glob.glob(os.path.join(root, "dev/vfio/[0-9]*"))))
  if tpus:
    found["tpu"] = f"{len(tpus)} TPU chip(s) ({tpus[0][len(root.rstrip('/')):]})"
  return found


def quiet_cuda_plugin_without_gpu(root: str = "/", environ=None) -> None:
  """Before JAX starts: on a machine with no NVIDIA GPU, skip the CUDA plugin's library check.

  jax-cuda12-plugin (0.7.2, Colab's) checks its CUDA libraries when JAX starts, whatever
  JAX_PLATFORMS says; it calls cuInit, which fails without a GPU, and JAX logs that as a
  20-line traceback (twice, with absl's handler) before running on the CPU as it would anyway.
  Without the check the plugin fails to start as quietly as JAX's other unavailable backends.
  Where a GPU may be present (NVIDIA device files, or WSL's /dev/dxg) nothing changes.
  """
  environ = os.environ if environ is None else environ
  if "gpu" not in accelerators(root) and not os.path.exists(os.path.join(root, "dev/dxg")):
    environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def _jax_has_gpu() -> bool:
  """Whether JAX, where this process imported it, runs on GPUs (CUDA or ROCm)."""
  jax = sys.modules.get("jax")
  try:
    return jax is not None and any(d.platform in ("gpu", "cuda", "rocm") for d in jax.devices())
  except RuntimeError:  # A backend that cannot start: JAX has no GPU either.
    return False


def gpu_possible(root: str = "/", jax_has_gpu=None) -> bool:
  """Whether TensorFlow could find a GPU: JAX runs on one, or device files show one (NVIDIA's
  /dev/nvidia0, /dev/nvidiactl; WSL's /dev/dxg; AMD's /dev/kfd)."""
  if "gpu" in accelerators(root) or any(os.path.exists(os.path.join(root, "dev", name))
                                        for name in ("nvidiactl", "dxg", "kfd")):
    return True
  return _jax_has_gpu() if jax_has_gpu is None else jax_has_gpu


def tensorflow_shares_the_gpu(tf=None, root: str = "/", jax_has_gpu=None) -> None:
  """Before TensorFlow first runs in a JAX process: TensorFlow takes GPU memory as it needs it,
  instead of nearly all that JAX's preallocation left (where JAX's cuDNN and cuBLAS workspaces
  come from). tfds's input pipeline, export's conversion and the Keras comparison use TensorFlow
  beside JAX. Nothing without TensorFlow or a GPU, or once TensorFlow has started its devices.
  Where no GPU can be (`gpu_possible`), TensorFlow is not asked: its look printed "E0000 ...
  failed call to cuInit" on every machine without one.
  `tf`: the module (imported here when not given)."""
  if not gpu_possible(root, jax_has_gpu):
    return
  if tf is None:
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top (heavy, optional)
    except ImportError:  # A tfds stand-in without TensorFlow (tests).
      return
  try:
    for gpu in tf.config.list_physical_devices("GPU"):
      tf.config.experimental.set_memory_growth(gpu, True)
  except RuntimeError:  # "Physical devices cannot be modified after being initialized".
    pass


def _installed() -> dict[str, str]:
  versions = {}
  for name in ("jax", "jaxlib", "libtpu", "libtpu-nightly", *CUDA_PLUGINS):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def _libtpu_jax_wants() -> str | None:
  """The libtpu version the installed jax's `[tpu]` extra pins, if it pins one."""
  try:
    for requirement in importlib.metadata.requires("jax") or ():
      match = re.match(r"libtpu(?:-nightly)?\s*==\s*([\w.]+)", requirement)
      if match and "tpu" in requirement:
        return match.group(1)
  except importlib.metadata.PackageNotFoundError:
    pass
  return None


def tpu_holders(root: str = "/") -> list[str]:
  """'pid command' of other processes that have a TPU device open."""
  holders = []
  for fd_dir in glob.glob(os.path.join(root, "proc/[0-9]*/fd")):
    pid = fd_dir.split("/")[-2]
    if pid == str(os.getpid()):
      continue
    try:
      targets = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
    except OSError:  # Gone, or another user's.
      continue
    if any(re.match(r"/dev/(accel\d|vfio/\d)", t) for t in targets):
      try:
        with open(os.path.join(root, "proc", pid, "cmdline"), "rb") as f:
          command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
      except OSError:
        command = "?"
      holders.append(f"{pid} {command[:80]}")
  return holders


def diagnose(kind: str, versions: dict[str, str] | None = None, root: str = "/",
             environ=None, libtpu_wanted: str | None = None) -> str:
  """The likely reason JAX did not start the `kind` ("gpu" | "tpu") backend."""
  versions = _installed() if versions is None else versions
  environ = os.environ if environ is None else environ
  jaxlib = versions.get("jaxlib", "?")
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and kind not in platforms and not (kind == "gpu" and "cuda" in platforms):
    return f"JAX_PLATFORMS={platforms} is set, which keeps JAX off the {kind.upper()}; unset it"
  if kind == "gpu":
    if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
      return f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r} hides the GPUs; unset it"
    plugins = {n: v for n, v in versions.items() if n in CUDA_PLUGINS}
    if not plugins:
      return (f"no JAX CUDA plugin is installed (jaxlib {jaxlib} alone runs on the CPU); "
              f"pip install 'jax[cuda12]=={versions.get('jax', jaxlib)}'")
    mismatched = {n: v for n, v in plugins.items() if v != jaxlib}
    if mismatched:
      name, version = sorted(mismatched.items())[0]
      return (f"{name} {version} does not match jaxlib {jaxlib}, so JAX skipped the plugin "
              f"(did an install upgrade jax?); restore the matching pair, e.g. "
              f"pip install 'jax=={version}' 'jaxlib=={version}'")
    return (f"the CUDA plugin ({', '.join(f'{n} {v}' for n, v in sorted(plugins.items()))}) "
            f"matches jaxlib {jaxlib} but did not start: a driver older than it needs, or the "
            "GPU's memory held by another process (see JAX's warning above)")
  holders = tpu_holders(root)
  if holders:
    return (f"the TPU is held by another process ({'; '.join(holders[:2])}), and only one "
            "process can use it: stop that process (in a notebook, restart the runtime and run "
            "JAX only in the training command, not in the kernel)")
  if "tpu" not in accelerators(root):
    return ("this machine has no TPU device (no /dev/accel* or /dev/vfio/N): it is not a TPU "
            "runtime; pick one (Colab: Runtime > Change runtime type), or pass "
            "--config.backend=auto to run on what there is")
  libtpu = versions.get("libtpu") or versions.get("libtpu-nightly")
  if not libtpu:
    return f"libtpu is not installed; pip install 'jax[tpu]=={versions.get('jax', jaxlib)}'"
  wanted = _libtpu_jax_wants() if libtpu_wanted is None else libtpu_wanted
  if wanted and wanted != libtpu:  # Not always the cause: Colab pairs jax 0.7.2 with 0.0.21.1.
    return (f"libtpu {libtpu} with jaxlib {jaxlib} did not start the TPU; jax "
            f"{versions.get('jax', '?')}'s own pin is libtpu {wanted}: if an install changed jax, "
            "restore the runtime's jax and jaxlib; else the runtime may need a restart (see "
            "JAX's warning above)")
  return (f"libtpu {libtpu} with jaxlib {jaxlib} did not start the TPU (another process may "
          "have just released it, or the runtime needs a restart; see JAX's warning above)")


def check(backend: str, actual: str | None = None, root: str = "/", environ=None) -> str | None:
  """After JAX has started: raises or warns when it is not on the platform it should be.

  Returns the warning given (None when all is as expected), for tests.
  """
  if actual is None:
    import jax  # pylint: disable=g-import-not-at-top
    actual = jax.default_backend()
  environ = os.environ if environ is None else environ
  if backend in ("gpu", "tpu") and actual != backend:
    raise UserError(f"config.backend={backend} but JAX started on {actual}: "
                    f"{diagnose(backend, root=root, environ=environ)}; or pass "
                    f"--config.backend=auto to run on {actual}")
  if backend != "auto" or actual != "cpu":
    return None
  found = accelerators(root)
  if not found or environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    return None  # No accelerator, or the CPU was asked for.
  kind, evidence = sorted(found.items())[0]
  message = (f"this machine has {evidence} but JAX is running on the CPU, which is many times "
             f"slower: {diagnose(kind, root=root, environ=environ)}. Pass "
             f"--config.backend={kind} to make this an error, or --config.backend=cpu to run on "
             "the CPU on purpose")
  logging.warning("%s\n%s\n%s", "!" * 100, message, "!" * 100)
  return message
