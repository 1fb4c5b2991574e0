"""The native kernels' C++ self-test (fashion_jax/kernels/csrc/selftest.cc): every kernel on
random inputs against plain loops in double precision, without XLA. Here it runs with
AddressSanitizer and UndefinedBehaviorSanitizer (out-of-bounds reads and writes in the blocked
loops' remainders, overflow, misaligned access), and built for 64-bit Arm (NEON) under qemu-user,
the only place the Arm build runs on these x86-64 machines."""

import platform
import shutil
import subprocess

import jax
import pytest

from fashion_jax.kernels import native_build

SELFTEST = native_build.SOURCE.parent / "selftest.cc"
FLAGS = ("-std=gnu++17", "-Wall", "-Wno-psabi")


def _build_and_run(compile_command, run_prefix=()):
  build = subprocess.run(compile_command, capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-3000:]
  run = subprocess.run([*run_prefix, compile_command[compile_command.index("-o") + 1]],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "checks passed" in run.stdout, run.stdout
  return run.stdout


def _run_arm_selftest(compiler, binary, qemu):
  """Builds the armv8-a (NEON, 4 lanes) self-test, static, with `compiler` (a command and its
  target options) and runs it under qemu-user."""
  (arm,) = native_build.TARGETS["aarch64"]
  out = _build_and_run([*compiler, *FLAGS, "-O2", "-static", arm.march, f"-DFJ_LANES={arm.lanes}",
                        "-isystem", jax.ffi.include_dir(), str(SELFTEST), "-o", str(binary)],
                       run_prefix=(qemu,))
  assert f"lanes={arm.lanes} isa=neon" in out


@pytest.mark.toolchain
def test_kernels_match_plain_loops_under_sanitizers(tmp_path):
  """The best level this CPU runs, at its width; -O0, so the build stays short (the optimised
  code's numbers are tests/test_native.py's)."""
  cxx = native_build.compiler()
  if cxx is None:
    pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) on this machine")
  if not native_build.runnable():
    pytest.skip(f"no native kernels for {platform.machine()} CPUs")
  target = native_build.runnable()[0]
  out = _build_and_run([cxx, *FLAGS, "-O0", "-fsanitize=address,undefined",
                        "-fno-sanitize-recover=all", target.march, f"-DFJ_LANES={target.lanes}",
                        "-isystem", jax.ffi.include_dir(), str(SELFTEST), "-o",
                        str(tmp_path / "selftest")])
  assert f"lanes={target.lanes} " in out


@pytest.mark.toolchain
def test_arm_build_matches_plain_loops_under_qemu(tmp_path):
  """The armv8-a (NEON, 4 lanes) target, built with the cross compiler and run by qemu-user;
  .ci/run installs both (Debian's g++-aarch64-linux-gnu and qemu-user)."""
  if platform.machine() in ("aarch64", "arm64"):
    pytest.skip("this machine is 64-bit Arm: the sanitizer test above ran the NEON build natively")
  cross, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
  if not (cross and qemu):
    pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu, "
                "qemu-user)")
  _run_arm_selftest([cross], tmp_path / "selftest_arm", qemu)


@pytest.mark.toolchain
def test_arm_build_by_clang_matches_plain_loops_under_qemu(tmp_path):
  """The same Arm build by Clang, the compiler of Apple silicon Macs (macOS has no GCC), against
  the cross compiler's headers and libraries. .ci/run installs Debian's clang."""
  if platform.machine() in ("aarch64", "arm64"):
    pytest.skip("this machine is 64-bit Arm: tests/test_native.py's Clang test built the NEON "
                "code natively")
  clang, cross, qemu = (shutil.which(name) for name in ("clang++", "aarch64-linux-gnu-g++",
                                                         "qemu-aarch64"))
  if not (clang and cross and qemu):
    pytest.skip("needs clang++, aarch64-linux-gnu-g++ (its headers and libraries) and "
                "qemu-aarch64 (Debian: clang, g++-aarch64-linux-gnu, qemu-user)")
  _run_arm_selftest([clang, "--target=aarch64-linux-gnu"], tmp_path / "selftest_arm_clang", qemu)
