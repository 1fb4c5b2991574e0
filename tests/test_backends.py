"""fashion_jax.support.backends: no silent CPU fallback on a machine with a GPU or TPU."""

import importlib.util
import os
import subprocess
import sys

import pytest

from fashion_jax.support import backends
from fashion_jax.support.errors import UserError
from tests.conftest import assert_one_line_error, run_module


def _machine(tmp_path, *device_files):
  """A fake filesystem root holding the given device files."""
  root = tmp_path / "root"
  for name in device_files:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("")
  (root / "proc").mkdir(parents=True, exist_ok=True)
  return str(root)


def test_accelerators_seen_from_device_files(tmp_path):
  assert backends.accelerators(_machine(tmp_path)) == {}
  gpu = backends.accelerators(_machine(tmp_path / "g", "dev/nvidia0", "dev/nvidiactl"))
  assert list(gpu) == ["gpu"] and "1 NVIDIA GPU(s) (/dev/nvidia0)" in gpu["gpu"]
  v5e = backends.accelerators(_machine(tmp_path / "t", "dev/vfio/0", "dev/vfio/vfio"))
  assert list(v5e) == ["tpu"] and "(/dev/vfio/0)" in v5e["tpu"]
  assert list(backends.accelerators(_machine(tmp_path / "v4", "dev/accel0"))) == ["tpu"]


def test_cuda_plugin_check_skipped_only_without_a_gpu(tmp_path):
  """No NVIDIA GPU: the CUDA plugin's start-up check (a traceback there) is skipped."""
  environ = {}
  backends.quiet_cuda_plugin_without_gpu(_machine(tmp_path / "cpu"), environ)
  assert environ == {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
  for i, files in enumerate([("dev/nvidia0",), ("proc/driver/nvidia/gpus/0000:00:04.0",),
                             ("dev/dxg",)]):  # A GPU, or maybe one (WSL): the check stays.
    environ = {}
    backends.quiet_cuda_plugin_without_gpu(_machine(tmp_path / str(i), *files), environ)
    assert environ == {}
  environ = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": ""}  # A user's own setting wins.
  backends.quiet_cuda_plugin_without_gpu(_machine(tmp_path / "set"), environ)
  assert environ == {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": ""}


VERSIONS = {"jax": "0.10.2", "jaxlib": "0.10.2"}


@pytest.mark.parametrize("versions, environ, expected", [
    (VERSIONS, {}, "no JAX CUDA plugin is installed"),
    # The Colab GPU runtime after an install upgraded jax: JAX skips the 0.7.2 plugin.
    ({**VERSIONS, "jax-cuda12-plugin": "0.7.2", "jax-cuda12-pjrt": "0.7.2"}, {},
     "jax-cuda12-pjrt 0.7.2 does not match jaxlib 0.10.2"),
    ({**VERSIONS, "jax-cuda12-plugin": "0.10.2"}, {}, "matches jaxlib 0.10.2 but did not start"),
    ({**VERSIONS, "jax-cuda12-plugin": "0.10.2"}, {"CUDA_VISIBLE_DEVICES": ""},
     "CUDA_VISIBLE_DEVICES='' hides the GPUs"),
    ({**VERSIONS, "jax-cuda12-plugin": "0.10.2"}, {"JAX_PLATFORMS": "cpu"},
     "JAX_PLATFORMS=cpu is set"),
])
def test_gpu_causes(tmp_path, versions, environ, expected):
  assert expected in backends.diagnose("gpu", versions, _machine(tmp_path), environ)


def test_tpu_causes(tmp_path):
  root = _machine(tmp_path, "dev/vfio/0")
  assert "libtpu is not installed" in backends.diagnose("tpu", VERSIONS, root, {})
  with_libtpu = {**VERSIONS, "libtpu": "0.0.21.1"}
  mismatch = backends.diagnose("tpu", with_libtpu, root, {}, libtpu_wanted="0.0.30")
  assert "own pin is libtpu 0.0.30: if an install changed jax, restore" in mismatch
  assert "pip install" not in mismatch  # Colab's own pairing differs from the pin and works.
  # No TPU device at all (a CPU or GPU runtime): said so, whatever the versions.
  assert "this machine has no TPU device" in backends.diagnose(
      "tpu", with_libtpu, _machine(tmp_path / "cpu"), {}, libtpu_wanted="0.0.30")
  assert "did not start the TPU" in backends.diagnose("tpu", with_libtpu, root, {},
                                                       libtpu_wanted="0.0.21.1")


def test_a_process_holding_the_tpu_is_named(tmp_path):
  """On Colab: the notebook kernel imported JAX, so the training command gets no TPU."""
  root = tmp_path / "root"
  fd_dir = root / "proc" / "4242" / "fd"
  fd_dir.mkdir(parents=True)
  os.symlink("/dev/vfio/0", fd_dir / "7")
  os.symlink("/dev/null", fd_dir / "0")
  (root / "proc" / "4242" / "cmdline").write_bytes(b"python3\0-m\0ipykernel_launcher\0")
  assert backends.tpu_holders(str(root)) == ["4242 python3 -m ipykernel_launcher"]
  message = backends.diagnose("tpu", {**VERSIONS, "libtpu": "0.0.21.1"}, str(root), {})
  assert "held by another process (4242 python3 -m ipykernel_launcher)" in message


def test_check_warns_loudly_on_a_silent_cpu_fallback(tmp_path):
  root = _machine(tmp_path, "dev/nvidia0")
  message = backends.check("auto", actual="cpu", root=root, environ={})
  assert "has 1 NVIDIA GPU(s)" in message and "running on the CPU" in message
  assert "--config.backend=gpu" in message
  # Nothing to say: on the GPU, no accelerator, or the CPU asked for.
  assert backends.check("auto", actual="gpu", root=root, environ={}) is None
  assert backends.check("auto", actual="cpu", root=_machine(tmp_path / "n"), environ={}) is None
  assert backends.check("auto", actual="cpu", root=root, environ={"JAX_PLATFORMS": "cpu"}) is None
  assert backends.check("cpu", actual="cpu", root=root, environ={}) is None


def test_check_makes_an_unmet_expectation_an_error(tmp_path):
  with pytest.raises(UserError, match=r"config.backend=tpu but JAX started on cpu: .*"
                                      r"--config.backend=auto"):
    backends.check("tpu", actual="cpu", root=_machine(tmp_path, "dev/accel0"), environ={})
  backends.check("gpu", actual="gpu", root=_machine(tmp_path / "g"), environ={})  # As asked.


def test_cli_backend_gpu_on_a_cpu_machine_is_one_line(tmp_path):
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                    "--config.backend=gpu", timeout=120)
  assert_one_line_error(proc, "config.backend=gpu but JAX started on cpu")
  assert not os.path.exists(tmp_path / "w" / "config.json")  # Stopped before the run began.


def test_cli_backend_cpu_keeps_jax_off_accelerators(tmp_path):
  """config.backend=cpu works without JAX_PLATFORMS (it sets JAX's platform before start-up)."""
  code = ("from fashion_jax.support import backends; backends.request('cpu'); import jax; "
          "print(jax.config.jax_platforms, jax.default_backend())")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=120)
  assert proc.stdout.split() == ["cpu", "cpu"], proc.stderr[-2000:]


def test_tensorflow_beside_jax_takes_gpu_memory_as_needed():
  """TensorFlow (tfds, export, the Keras comparison) in a JAX process: memory growth on each GPU,
  so it does not take nearly all that JAX's preallocation left; too late (TensorFlow started)
  changes nothing and is no error."""
  grown = []

  class FakeTf:  # tf.config's two calls, on a machine with two GPUs.
    class config:  # pylint: disable=invalid-name
      list_physical_devices = staticmethod(lambda kind: ["GPU:0", "GPU:1"] if kind == "GPU" else [])

      class experimental:  # pylint: disable=invalid-name
        @staticmethod
        def set_memory_growth(device, enable):
          if grown == ["late"]:
            raise RuntimeError("Physical devices cannot be modified after being initialized")
          grown.append((device, enable))

  backends.tensorflow_shares_the_gpu(FakeTf, jax_has_gpu=True)
  assert grown == [("GPU:0", True), ("GPU:1", True)]
  grown[:] = ["late"]
  backends.tensorflow_shares_the_gpu(FakeTf, jax_has_gpu=True)
  assert grown == ["late"]


@pytest.mark.parametrize("device_files,jax_has_gpu,asked", [
    ((), False, False),  # No GPU can be here: TensorFlow's look printed "failed call to cuInit".
    ((), True, True),  # JAX runs on a GPU that no NVIDIA device file shows (ROCm, a container).
    (("dev/nvidia0",), False, True),  # A GPU JAX does not use (JAX_PLATFORMS=cpu): TF would.
    (("dev/nvidiactl",), False, True),
    (("proc/driver/nvidia/gpus/0000:00:04.0",), False, True),
    (("dev/dxg",), False, True)])  # WSL.
def test_tensorflow_is_asked_for_gpus_only_where_one_can_be(tmp_path, device_files, jax_has_gpu,
                                                            asked):
  calls = []

  class FakeTf:  # Records whether TensorFlow was asked for its GPUs.
    class config:  # pylint: disable=invalid-name
      list_physical_devices = staticmethod(lambda kind: calls.append(kind) or [])

  root = _machine(tmp_path, *device_files)
  backends.tensorflow_shares_the_gpu(FakeTf, root=str(root), jax_has_gpu=jax_has_gpu)
  assert calls == (["GPU"] if asked else [])
  assert backends.gpu_possible(str(root), jax_has_gpu) is asked


def test_without_a_gpu_tensorflow_prints_no_cuinit_error():
  """The real check, in a process whose JAX runs on the CPU, on a machine with no GPU."""
  import jax  # pylint: disable=import-outside-toplevel
  assert backends._jax_has_gpu() is (jax.default_backend() == "gpu")  # pylint: disable=protected-access
  if importlib.util.find_spec("tensorflow") is None or backends.gpu_possible():
    pytest.skip("needs TensorFlow on a machine without a GPU")
  code = ("import jax; jax.devices(); from fashion_jax.support import backends; "
          "backends.tensorflow_shares_the_gpu(); import tensorflow; print('ok')")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.stdout.split() == ["ok"], proc.stderr[-2000:]
  assert "cuInit" not in proc.stderr
