"""Native CPU kernels: C++ through XLA's FFI, compiled on first use for this machine.

Both conv+pool layers of the classic CNN spend much of their time in memory passes XLA:CPU cannot
fuse away (BENCHMARKS.md). `csrc/conv_pool.cc` removes them; `conv3x3_pool2` picks the kernel:

- Few input channels (the first layer, 1 -> 32): a direct convolution fused with the pool. XLA
  runs it as a K=9 matmul limited by memory traffic, then writes, re-reads and scatters the
  full-resolution activation for the pool and its gradient; the kernel computes each pooling
  window's four outputs in registers and writes only the pooled value and its argmax. The
  backward routes the gradient to the argmax and accumulates the kernel gradient in registers.
- Wide inputs (the second layer, 32 -> 64): Winograd F(2x2, 3x3) as in
  `fashion_jax.kernels.winograd`. The four transforms around the channel contractions are one
  pass each instead of a gather, a matmul and a reduction apiece; the forward and input-gradient
  contractions stay XLA matmuls, and the weight gradient's (a [C, tiles] x [tiles, K] product,
  ~40 GFLOP/s in XLA:CPU) is a register-blocked kernel (~80 GFLOP/s).

`conv3x3` does the same for a 3x3 convolution without a pool (cnn_bn, ResNets): native input
transform, its gradient and the weight gradient; XLA's matmuls and output transform.

Measured (A/B of the CNN's train step, 2 cores): +40 % first layer, +13-17 % transforms, +10-14 %
weight gradient. The source ships with the package; the first call compiles it with the system
C++ compiler (`$CXX`, else `c++`/`g++`/`clang++`), `-march=native` and a vector width (`lanes()`)
into a cache (`$FASHION_JAX_CACHE_DIR`, default `~/.cache/fashion_jax`) keyed by the source,
compiler, flags, jaxlib and CPU, so later runs load it in milliseconds. Without a compiler, or
with `FASHION_JAX_NATIVE=0`, `available()` is False and "auto" keeps the XLA formulations
(`fashion_jax.kernels.ops`), which compute the same math.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
from pathlib import Path
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp

from fashion_jax.kernels import winograd
from fashion_jax.support import paths

SOURCE = Path(__file__).parent / "csrc" / "conv_pool.cc"
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-shared", "-fPIC", "-Wno-psabi")
LANES = (4, 8, 16)  # Vector widths (floats) the kernels build with; see lanes().
_TARGETS = {"fashion_jax_conv_pool_fwd": "FjConvPoolForward",
            "fashion_jax_conv_pool_bwd": "FjConvPoolBackward",
            "fashion_jax_winograd_input": "FjWinogradInput",
            "fashion_jax_winograd_input_grad": "FjWinogradInputGrad",
            "fashion_jax_winograd_output_pool": "FjWinogradOutputPool",
            "fashion_jax_winograd_output_pool_grad": "FjWinogradOutputPoolGrad",
            "fashion_jax_winograd_weight_grad": "FjWinogradWeightGrad"}
DIRECT_MAX_CHANNELS = 8  # Direct convolution below this many input channels, Winograd from it.


class NativeUnavailable(RuntimeError):
  pass


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def cache_dir() -> Path:
  return paths.cache_root() / "native"


@functools.cache
def lanes() -> int:
  """The kernels' vector width in floats: 8 (AVX2's registers), or `FASHION_JAX_NATIVE_LANES`.

  16 (AVX-512's width) is not the default until measured faster there: wider than the registers
  it spills them, and made the CNN's step 2.4x slower on AVX2 (BENCHMARKS.md). Channel counts
  must be multiples of the width for the kernels to apply (`supports`).
  """
  wanted = os.environ.get("FASHION_JAX_NATIVE_LANES", "")
  if wanted:
    if not wanted.isdigit() or int(wanted) not in LANES:
      raise ValueError(f"FASHION_JAX_NATIVE_LANES={wanted!r}: use one of {LANES}")
    return int(wanted)
  return 8


def build_flags() -> tuple[str, ...]:
  return (*FLAGS, f"-DFJ_LANES={lanes()}")


def _cpu_identity() -> str:
  """What -march=native depends on: the CPU model and feature flags."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return f"{platform.machine()} {platform.processor()}"


def _build_key(compiler: str, include: str) -> str:
  """What the library depends on: source, compiler, flags, jax/jaxlib, the FFI headers, CPU."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           timeout=60).stdout
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib_version = "?"
  headers = b"".join(path.read_bytes() for path in sorted(Path(include).rglob("*.h")))
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), version.encode(), " ".join(build_flags()).encode(),
               jax.__version__.encode(), jaxlib_version.encode(), headers,
               _cpu_identity().encode()):
    key.update(part)
    key.update(b"\0")
  return key.hexdigest()[:16]


def _private(path: Path, root: Path) -> bool:
  """Whether `path` and every folder from `root` down to it are this user's alone.

  Owned by the user, no symlink, not writable by group or others: nobody else
  can have put (or can swap in) a library to load. Anything else is not used.
  """
  uid = os.getuid()
  current = path
  while True:
    try:
      info = os.lstat(current)
    except OSError:
      return False
    if stat.S_ISLNK(info.st_mode) or info.st_uid != uid or info.st_mode & 0o022:
      return False
    if current == root or current.parent == current:
      return True
    current = current.parent


def _cached_library(key: str) -> Path | None:
  """The user's own cached build for `key`, if there is one to trust."""
  library = cache_dir() / key / "conv_pool.so"
  if not library.exists():
    return None
  if not _private(library, cache_dir()):
    logging.warning("not loading %s: it or a folder above it is not yours alone (another owner, "
                    "a symlink, or writable by others); building a private copy instead", library)
    return None
  return library


def _build_dir(key: str) -> tuple[Path, bool]:
  """(Where to build, whether it is the persistent cache): the cache if it can be made private,
  else a fresh `mkdtemp` folder (never a predictable shared path)."""
  out_dir = cache_dir() / key
  try:
    missing = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    for folder in reversed(missing):  # Each folder made here: this user's alone, whatever umask.
      folder.mkdir(exist_ok=True)
      os.chmod(folder, 0o700)
    if os.access(out_dir, os.W_OK) and _private(out_dir, cache_dir()):
      return out_dir, True
  except OSError:
    pass
  out_dir = Path(tempfile.mkdtemp(prefix="fashion_jax_native_"))
  logging.warning("%s is not writable (or not yours alone); building the native kernels in %s "
                  "for this process", cache_dir(), out_dir)
  return out_dir, False


def _build(compiler: str, include: str, key: str) -> Path:
  """Compiles the kernels into the cache (unless already there); returns the library's path.

  One build at a time per cache entry (a file lock), so concurrent processes build once.
  """
  cached = _cached_library(key)
  if cached is not None:
    return cached
  out_dir, persistent = _build_dir(key)
  library = out_dir / "conv_pool.so"
  with paths.exclusive(out_dir / ".lock"):
    if persistent and (cached := _cached_library(key)) is not None:
      return cached  # Another process built it while this one waited.
    logging.info("Compiling fashion_jax's native CPU kernels (once per machine) into %s", out_dir)
    start = time.perf_counter()
    # Build beside the target and rename: concurrent processes never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
      result = subprocess.run([compiler, *build_flags(), "-isystem", include, str(SOURCE), "-o", tmp],
                              capture_output=True, text=True, timeout=600)
      if result.returncode != 0:
        raise NativeUnavailable(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
      os.chmod(tmp, 0o700)
      os.replace(tmp, library)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
    logging.info("Compiled the native kernels in %.1fs", time.perf_counter() - start)
  return library


_registered = False  # XLA accepts one handler per target name and process.
_library_path: Path | None = None  # What _load loaded.
_library_info = ""  # What it was built for (FjKernelInfo): "lanes=16 isa=avx512f,avx2,fma".
_lock = threading.Lock()


@functools.cache
def _load() -> str | None:
  """Builds (or finds) and registers the kernels. Returns None, or why they are unavailable."""
  global _registered, _library_path, _library_info
  if os.environ.get("FASHION_JAX_NATIVE", "1") == "0":
    return "disabled by FASHION_JAX_NATIVE=0"
  compiler = _compiler()
  if compiler is None:
    return "no C++ compiler found (set CXX or install g++/clang++)"
  with _lock:
    try:
      include = jax.ffi.include_dir()
      key = _build_key(compiler, include)
      path = _build(compiler, include, key)
      try:
        library = ctypes.cdll.LoadLibrary(str(path))
      except OSError:  # A damaged cache entry: build it again, once.
        path.unlink()
        path = _build(compiler, include, key)
        library = ctypes.cdll.LoadLibrary(str(path))
      _library_path = path
      library.FjKernelInfo.restype = ctypes.c_char_p
      _library_info = library.FjKernelInfo().decode()
      if not _registered:
        for target, symbol in _TARGETS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                      platform="cpu")
        _registered = True
    except (OSError, subprocess.SubprocessError, NativeUnavailable, AttributeError, ValueError,
            jax.errors.JaxRuntimeError) as e:
      return f"{type(e).__name__}: {e}"
  return None


@functools.cache
def _warn_once(reason: str) -> None:
  logging.warning("fashion_jax native CPU kernels unavailable (%s); using the XLA "
                  "formulations, which compute the same but train slower.", reason)


def available() -> bool:
  """Whether the native kernels are built and registered (builds them on first call)."""
  reason = _load()
  if reason is not None:
    _warn_once(reason)
  return reason is None


def info() -> dict | None:
  """{"lanes": 8, "isa": "avx2,fma", "library": path} of the loaded build, or None (unavailable)."""
  if not available():
    return None
  fields = dict(part.split("=", 1) for part in _library_info.split())
  return {"lanes": int(fields["lanes"]), "isa": fields["isa"], "library": str(_library_path)}


def fits_lanes(channels: int) -> bool:
  """Whether a channel count is a multiple of the kernels' vector width."""
  try:
    return channels % lanes() == 0
  except ValueError:  # A bad FASHION_JAX_NATIVE_LANES: available() says why.
    return False


def supports(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether `conv3x3_pool2` handles these shapes and dtypes (not whether it is built)."""
  return (x.ndim == 4 and kernel.ndim == 4 and kernel.shape[:2] == (3, 3)
          and kernel.shape[2] == x.shape[-1] and fits_lanes(kernel.shape[-1])
          and (x.shape[-1] < DIRECT_MAX_CHANNELS or fits_lanes(x.shape[-1]))
          and x.shape[1] >= 4 and x.shape[2] >= 4
          and x.dtype == kernel.dtype == jnp.float32)


def conv3x3_pool2(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """max_pool_2x2(conv_3x3_valid(x, kernel) + bias), fused, on CPU.

  x NHWC float32, kernel HWIO [3, 3, Cin, Cout] float32, with Cout a multiple of `lanes()` and
  either Cin < 8 (direct kernel) or Cin a multiple of `lanes()` (Winograd) (`supports`).
  Ties in a pooling window go to the first maximum, like `reduce_window`'s
  gradient. Builds the kernels on first use; raises ValueError if they are
  unavailable (`available()`) or the shapes are not supported.
  """
  if not supports(x, kernel):
    raise ValueError(f"native conv3x3_pool2 does not support x {x.shape} {x.dtype}, "
                     f"kernel {kernel.shape} {kernel.dtype}; see native.supports")
  if not available():
    raise ValueError(f"the native CPU kernels are unavailable: {_load()}")
  bias = bias.astype(jnp.float32)
  if x.shape[-1] < DIRECT_MAX_CHANNELS:
    return _direct(x, kernel, bias)
  return _winograd(x, kernel, bias)


def _call(target, results, *args):
  return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args)


def _pooled_shapes(x, kernel):
  n, h, w, _ = x.shape
  pooled = jax.ShapeDtypeStruct((n, (h - 2) // 2, (w - 2) // 2, kernel.shape[-1]), jnp.float32)
  return pooled, jax.ShapeDtypeStruct(pooled.shape, jnp.int8)


# Direct kernel (few input channels).

@jax.custom_vjp
def _direct(x, kernel, bias):
  return _call("fashion_jax_conv_pool_fwd", _pooled_shapes(x, kernel), x, kernel, bias)[0]


def _direct_fwd(x, kernel, bias):
  y, which = _call("fashion_jax_conv_pool_fwd", _pooled_shapes(x, kernel), x, kernel, bias)
  return y, (x, kernel, which)


def _direct_bwd(residuals, dy):
  x, kernel, which = residuals
  dkernel, dbias = _call("fashion_jax_conv_pool_bwd",
                         (jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
                          jax.ShapeDtypeStruct(kernel.shape[-1:], jnp.float32)),
                         x, kernel, which, dy)
  # The input gradient (unused, and so removed by XLA, when x is the image): the
  # transposed convolution of the gradient routed to each window's argmax.
  conv = lambda v: lax.conv_general_dilated(v, kernel, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  n, h, w, _ = x.shape
  routed = winograd.unpool_to_argmax(dy, which, (n, h - 2, w - 2, dy.shape[-1]))
  dx = jax.vjp(conv, x)[1](routed)[0]
  return dx, dkernel, dbias


_direct.defvjp(_direct_fwd, _direct_bwd)


# Winograd kernels (wide inputs): native transforms around XLA's matmuls.

def _winograd_forward(x, kernel, bias):
  th, tw = winograd.tile_counts(x.shape, pooled=True)
  v = _call("fashion_jax_winograd_input",
            jax.ShapeDtypeStruct((16, x.shape[0] * th * tw, x.shape[-1]), jnp.float32), x)
  u = winograd.filter_transform(kernel)
  y, which = _call("fashion_jax_winograd_output_pool", _pooled_shapes(x, kernel),
                   winograd.product(v, u), bias)
  return y, (v, u, which, x.shape)


@jax.custom_vjp
def _winograd(x, kernel, bias):
  return _winograd_forward(x, kernel, bias)[0]


def _winograd_bwd(residuals, dy):
  v, u, which, x_shape = residuals
  dm = _call("fashion_jax_winograd_output_pool_grad",
             jax.ShapeDtypeStruct((16, v.shape[1], u.shape[2]), jnp.float32), dy, which)
  du = _call("fashion_jax_winograd_weight_grad", jax.ShapeDtypeStruct(u.shape, jnp.float32), v, dm)
  dv, dkernel = winograd.product_grads(v, u, dm, du=du)
  dx = _call("fashion_jax_winograd_input_grad", jax.ShapeDtypeStruct(x_shape, jnp.float32), dv)
  return dx, dkernel, jnp.sum(dy, axis=(0, 1, 2))


_winograd.defvjp(_winograd_forward, _winograd_bwd)



# Winograd 3x3 convolution without a pool (cnn_bn, ResNets): the input transform
# and its gradient and the weight gradient native, the output transform XLA's.

def supports_conv(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether `conv3x3` handles these shapes and dtypes (not whether it is built)."""
  return (x.ndim == 4 and kernel.ndim == 4 and kernel.shape[:2] == (3, 3)
          and kernel.shape[2] == x.shape[-1] and fits_lanes(x.shape[-1])
          and fits_lanes(kernel.shape[-1]) and x.shape[1] >= 3 and x.shape[2] >= 3
          and x.dtype == kernel.dtype == jnp.float32)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID, stride-1 3x3 convolution by Winograd F(2x2, 3x3) with native transforms.

  x NHWC float32 with C and Cout multiples of `lanes()`
  (`supports_conv`); SAME padding is the caller's `jnp.pad`. Raises ValueError
  like `conv3x3_pool2`.
  """
  if not supports_conv(x, kernel):
    raise ValueError(f"native conv3x3 does not support x {x.shape} {x.dtype}, "
                     f"kernel {kernel.shape} {kernel.dtype}; see native.supports_conv")
  if not available():
    raise ValueError(f"the native CPU kernels are unavailable: {_load()}")
  return _conv(x, kernel)


def _conv_forward(x, kernel):
  xp, th, tw = winograd.pad_to_tiles(x)
  v = _call("fashion_jax_winograd_input",
            jax.ShapeDtypeStruct((16, x.shape[0] * th * tw, x.shape[-1]), jnp.float32), xp)
  u = winograd.filter_transform(kernel)
  return winograd.outputs_to_image(winograd.product(v, u), x.shape, th, tw), (v, u, x.shape)


@jax.custom_vjp
def _conv(x, kernel):
  return _conv_forward(x, kernel)[0]


def _conv_bwd(residuals, dy):
  v, u, x_shape = residuals
  b, h, w, c = x_shape
  th, tw = winograd.tile_counts(x_shape, pooled=False)
  dm = winograd.outputs_to_image_grad(dy, x_shape, th, tw)
  du = _call("fashion_jax_winograd_weight_grad", jax.ShapeDtypeStruct(u.shape, jnp.float32), v, dm)
  dv, dkernel = winograd.product_grads(v, u, dm, du=du)
  dxp = _call("fashion_jax_winograd_input_grad",
              jax.ShapeDtypeStruct((b, 2 * th + 2, 2 * tw + 2, c), jnp.float32), dv)
  return dxp[:, :h, :w], dkernel


_conv.defvjp(_conv_forward, _conv_bwd)


def main() -> int:
  """`python -m fashion_jax.kernels.native`: builds the kernels now (e.g. in a Docker image or a
  Colab setup cell) and says where they are, or why they are unavailable."""
  logging.set_verbosity(logging.INFO)
  reason = _load()
  if reason is not None:
    print(f"fashion_jax native CPU kernels: unavailable: {reason}")
    return 1
  print(f"fashion_jax native CPU kernels: ready ({_library_info}; {_library_path})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
