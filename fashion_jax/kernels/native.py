"""Native CPU kernels: C++ through XLA's FFI, compiled on first use for this CPU's ISA level.

Both conv+pool layers of the classic CNN spend much of their time in memory passes XLA:CPU cannot
fuse away (BENCHMARKS.md). `csrc/conv_pool.cc` removes them; `conv3x3_pool2` picks the kernel,
with the ReLU that follows fused in (`relu=True`):

- Few input channels (the first layer, 1 -> 32): a direct convolution fused with the pool. XLA
  runs it as a K=9 matmul limited by memory traffic, then writes, re-reads and scatters the
  full-resolution activation for the pool and its gradient; the kernel computes each pooling
  window's four outputs in registers and writes only the pooled value and its argmax. The
  backward routes the gradient to the argmax and accumulates the kernel gradient in registers.
- Wide inputs (the second layer, 32 -> 64): Winograd F(2x2, 3x3) as in
  `fashion_jax.kernels.winograd`, the whole layer in one kernel per direction, a block of an
  image's tiles at a time in cache: input transform, the 16 per-tile channel products (a
  register-blocked micro-kernel), output transform, pool, bias and ReLU; the backward recomputes
  the transformed input instead of keeping it and produces dx, the kernel's and the bias's
  gradients. XLA's matmuls between separate transforms had written and re-read [16, tiles, K]
  planes (26 MB at batch 256) and were bound by that traffic.

The Winograd layers' filter transform U = G g G^T, its transpose (the backward's operand) and
its gradient run here too (`filter_transform`, `filter_transform_grad`), U^T written directly
where XLA copied U into it (the CNN's train step at batch 32: 1.15 -> 1.12 ms on Zen 4).

The 3x3 convolution without a pool (cnn_bn, ResNets) is `fashion_jax.kernels.plain_conv`,
BatchNorm + ReLU `fashion_jax.kernels.batchnorm`, dropout's mask `fashion_jax.kernels.dropout`,
the dense layers' matmuls `fashion_jax.kernels.dense` and Adam's update `fashion_jax.kernels.adam`,
on the same kernels and build.

The classic CNN's two conv + pool layers as one op are `fashion_jax.kernels.two_layers`.

Measured (the CNN's train step, 2 cores of a Zen 5 VM, BENCHMARKS.md): 47,500 images/s, 71 % of
the CPU's measured peak FLOP/s executed, 4.2x Keras in the same run.

The source ships with the package; the first call compiles it with the system C++ compiler
(`$CXX`, else `c++`/`g++`/`clang++`) for the best ISA level this CPU runs (AVX-512, AVX2 or the
architecture's baseline, each with its vector width; `native_build`) into a cache
(`$FASHION_JAX_CACHE_DIR`, default `~/.cache/fashion_jax`), so later runs load it in
milliseconds. Without a compiler a prebuilt library is used (`python -m
fashion_jax.kernels.native --all`); without either, or with `FASHION_JAX_NATIVE=0` (false, no,
off), `available()` is False and "auto" keeps the XLA formulations (`fashion_jax.kernels.ops`), which
compute the same math.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
import threading

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fashion_jax.kernels import native_build
from fashion_jax.kernels import winograd
from fashion_jax.kernels.native_build import NativeUnavailable
from fashion_jax.support import paths

_TARGETS = {f"fashion_jax_{name}": symbol for name, symbol in (  # XLA's name: the C symbol.
    ("conv_pool_fwd", "FjConvPoolForward"), ("conv_pool_bwd", "FjConvPoolBackward"),
    ("winograd_conv_pool_fwd", "FjWinogradConvPoolForward"),
    ("winograd_conv_pool_bwd", "FjWinogradConvPoolBackward"),
    ("winograd_conv_fwd", "FjWinogradConvForward"), ("winograd_conv_bwd", "FjWinogradConvBackward"),
    ("filter_transform", "FjFilterTransform"), ("filter_transform_grad", "FjFilterTransformGrad"),
    ("two_layer_fwd", "FjTwoLayerForward"), ("two_layer_train_fwd", "FjTwoLayerTrainForward"),
    ("two_layer_bwd", "FjTwoLayerBackward"),
    ("bn_stats", "FjBnStats"), ("bn_relu_fwd", "FjBnReluForward"),
    ("bn_relu_grad_sums", "FjBnReluGradSums"), ("bn_relu_grad", "FjBnReluGrad"),
    ("bn_relu_pool_fwd", "FjBnReluPoolForward"),
    ("bn_relu_pool_grad_sums", "FjBnReluPoolGradSums"),
    ("bn_relu_pool_grad", "FjBnReluPoolGrad"),
    ("direct_conv_fwd", "FjDirectConvForward"), ("direct_conv_bwd", "FjDirectConvBackward"),
    ("keep_mask", "FjKeepMask"), ("dense_fwd", "FjDenseForward"),
    ("dense_bwd", "FjDenseBackward"), ("adam", "FjAdam"))}
DIRECT_MAX_CHANNELS = 8  # Direct convolution below this many input channels, Winograd from it.

_registered = False  # XLA accepts one handler per target name and process.
_loaded: dict = {}  # What _load loaded: target, lanes, isa (FjKernelInfo), library.
_library: list = []  # The loaded ctypes library (for its plain C functions), once loaded.
_lock = threading.Lock()


def lanes() -> int:
  """The kernels' vector width in floats: the loaded build's, else the one `native_build.choose`
  picks for this CPU (16 with AVX-512, 8 with AVX2, 4 otherwise). Channel counts must be
  multiples of it for the kernels to apply (`supports`). ValueError: a bad override.
  Disabled, or tried and not loaded: the best target's nominally, without a compiler probe
  (`FASHION_JAX_NATIVE=0` had started the compiler on every `supports`)."""
  if _loaded:
    return _loaded["lanes"]
  probe = not disabled() and not _load.cache_info().currsize
  try:
    return native_build.choose(jax.ffi.include_dir(), probe=probe)[1]
  except NativeUnavailable as e:
    raise ValueError(str(e)) from e


def disabled() -> bool:
  """Whether `FASHION_JAX_NATIVE` turns the kernels off: 0, false, no or off, in any case (only 0
  did: `FASHION_JAX_NATIVE=false` ran them)."""
  return paths.turned_off("FASHION_JAX_NATIVE")


_open_fds: list = []  # Kept open: glibc knows a library by the name it was loaded by.


def _dlopen(path):
  """Loads `path` through the descriptor `native_build.open_library` checked (its /proc name,
  where there is one): a folder swapped on the way after the check cannot change what runs."""
  fd = native_build.open_library(path)
  name = f"/proc/self/fd/{fd}"
  try:
    library = ctypes.CDLL(name if os.path.exists(name) else str(path))
  except OSError as e:
    os.close(fd)
    raise OSError(str(e).replace(name, str(path))) from e
  _open_fds.append(fd)
  return library


def _load() -> str | None:
  """Builds (or finds) and registers the kernels, once. Returns None, or why they are unavailable.
  Under a lock: with functools.cache alone, threads calling it first at once each loaded, the
  later ones clearing what an earlier one had loaded while its caller read it (info() None)."""
  with _lock:
    return _load_once()


@functools.cache
def _load_once() -> str | None:
  """`_load`'s work, under its lock."""
  global _registered
  if disabled():
    return f"disabled by FASHION_JAX_NATIVE={os.environ['FASHION_JAX_NATIVE']}"
  _loaded.clear()
  _library.clear()
  try:
    include = jax.ffi.include_dir()
    target, width = native_build.choose(include)
    path = native_build.build(target, width, include)
    try:
      library = _dlopen(path)
    except OSError as e:  # A damaged or pruned entry, or another machine's: built anew, once.
      try:
        path = native_build.build(target, width, include, failed=path)
      except NativeUnavailable as again:
        raise NativeUnavailable(f"{e}; {again}") from e
      library = _dlopen(path)
    native_build.mark_used(path)
    library.FjKernelInfo.restype = ctypes.c_char_p
    library.FjMeasurePeak.argtypes = (ctypes.c_int, ctypes.c_double,
                                      ctypes.POINTER(ctypes.c_double),
                                      ctypes.POINTER(ctypes.c_double),
                                      ctypes.POINTER(ctypes.c_int))
    fields = dict(part.split("=", 1) for part in library.FjKernelInfo().decode().split())
    if not _registered:
      for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
      _registered = True
    _loaded.update(target=target.name, lanes=int(fields["lanes"]), isa=fields["isa"],
                   library=str(path))
    _library[:] = [library]
  except (OSError, subprocess.SubprocessError, NativeUnavailable, AttributeError,
          ValueError, KeyError, jax.errors.JaxRuntimeError) as e:
    _loaded.clear()
    _library.clear()
    return f"{type(e).__name__}: {e}"
  return None


_load.cache_clear = _load_once.cache_clear  # (Tests load afresh.)
_load.cache_info = _load_once.cache_info


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


def available_without_building() -> bool:
  """Whether the kernels are loaded, or can be without compiling them (this CPU's build is in the
  cache): `available()` then, else False. Inference takes them only so: a first build takes
  ~15 s, longer than most predictions."""
  if disabled():
    return False
  if not _load.cache_info().currsize:  # Not tried yet in this process.
    try:
      include = jax.ffi.include_dir()
      if native_build.cached(native_build.build_key(*native_build.choose(include), include)) is None:
        return False
    except (OSError, NativeUnavailable, ValueError):
      return False
  return available()


def info() -> dict | None:
  """{"target": "x86-64-v4", "lanes": 16, "isa": "avx512f,avx2,fma", "library": path} of the
  loaded build (isa: what its compiler enabled), or None (unavailable)."""
  return dict(_loaded) if available() else None


def measure_peak(threads: int, seconds: float = 0.4, lanes: int = 0) -> dict | None:
  """Times the CPU's float32 multiply-add peak: `threads` threads (one per core) each run
  independent FMA chains at `lanes` floats per vector (0: the widest the CPU has, found at run
  time, whatever width the kernels were built for) for about seconds / 2, then a dependent
  integer add chain (one per cycle) for the clock.

  Returns {"gflops": all threads, "mhz": the clock, "lanes", "threads"}, or None where the
  kernels are unavailable or this architecture has no measurement. ValueError: the CPU lacks
  `lanes`.
  """
  if not available():
    return None
  gflops, mhz, width = ctypes.c_double(), ctypes.c_double(), ctypes.c_int(lanes)
  status = _library[0].FjMeasurePeak(threads, seconds, ctypes.byref(gflops), ctypes.byref(mhz),
                                     ctypes.byref(width))
  if status == -2:
    raise ValueError(f"this CPU has no {lanes}-float vector multiply-add")
  if status != 0:
    return None
  return {"gflops": gflops.value, "mhz": mhz.value, "lanes": width.value, "threads": threads}


def fits_lanes(channels: int) -> bool:
  """Whether a channel count is a multiple of the kernels' vector width."""
  try:
    return channels % lanes() == 0
  except ValueError:  # A bad override, or no kernels for this CPU: available() says why.
    return False


# The fused Winograd kernels re-read U (and accumulate dU) per block of one image's tiles: fine
# while a plane of them fits a core's cache with room to spare, memory-bound beyond. Measured
# (BENCHMARKS.md, session 9): 256 -> 256 channels still 1.2x faster forward + backward than XLA's
# Winograd, 640 -> 640 1.8x slower; above this product "auto" keeps XLA's formulation.
WINOGRAD_MAX_CHANNEL_PRODUCT = 256 * 256


def winograd_channels_fit(cin: int, cout: int) -> bool:
  return fits_lanes(cin) and fits_lanes(cout) and cin * cout <= WINOGRAD_MAX_CHANNEL_PRODUCT


def supports(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether `conv3x3_pool2` handles these shapes and dtypes (not whether it is built)."""
  return (x.ndim == 4 and kernel.ndim == 4 and kernel.shape[:2] == (3, 3)
          and kernel.shape[2] == x.shape[-1] and fits_lanes(kernel.shape[-1])
          and (x.shape[-1] < DIRECT_MAX_CHANNELS
               or winograd_channels_fit(x.shape[-1], kernel.shape[-1]))
          and x.shape[1] >= 4 and x.shape[2] >= 4
          and x.dtype == kernel.dtype == jnp.float32)


def conv3x3_pool2(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                  relu: bool = False) -> jax.Array:
  """max_pool_2x2(conv_3x3_valid(x, kernel) + bias), fused, on CPU; then max(., 0) with `relu`
  (ReLU and max-pooling commute, so this is also the pool of the ReLU'd convolution).

  x NHWC float32, kernel HWIO [3, 3, Cin, Cout] float32, with Cout a multiple of `lanes()` and
  either Cin < 8 (direct kernel) or Cin a multiple of `lanes()` with Cin * Cout at most
  `WINOGRAD_MAX_CHANNEL_PRODUCT` (Winograd) (`supports`).
  Ties in a pooling window go to the first maximum, like `reduce_window`'s
  gradient; the ReLU's gradient at 0 is 0, like `jax.nn.relu`'s. Builds the kernels on first
  use; raises ValueError if they are unavailable (`available()`) or the shapes are not
  supported.
  """
  if not supports(x, kernel):
    raise ValueError(f"native conv3x3_pool2 does not support x {x.shape} {x.dtype}, "
                     f"kernel {kernel.shape} {kernel.dtype}; see native.supports")
  if not available():
    raise ValueError(f"the native CPU kernels are unavailable: {_load()}")
  bias = channel_vector(bias, kernel.shape[-1])
  if x.shape[-1] < DIRECT_MAX_CHANNELS:
    return _direct(x, kernel, bias, bool(relu))
  return _winograd(x, kernel, bias, bool(relu))


def channel_vector(a, channels: int, what: str = "bias") -> jax.Array:
  """`a` (a bias, a scale) as float32 [channels], broadcast as `y + a` would be; ValueError where
  it does not broadcast. (The kernels read `channels` floats: a bias of shape () or [16] for 32
  channels had them read past its end, outputs garbage or NaN.)"""
  a = jnp.asarray(a)
  if a.shape not in ((), (1,), (channels,)):
    raise ValueError(f"the {what} must have shape ({channels},) (or be one value), not {a.shape}")
  return jnp.broadcast_to(a.astype(jnp.float32), (channels,))


def call(target, results, *args, input_output_aliases=None, **attributes):
  """jax.ffi.ffi_call of one of the kernels (`_TARGETS`; call `available()` first)."""
  return jax.ffi.ffi_call(target, results, vmap_method="sequential",
                          input_output_aliases=input_output_aliases)(*args, **attributes)


def filter_transform(kernel: jax.Array, tile: int, transposed: bool = False) -> jax.Array:
  """`winograd.filter_transform(kernel, tile)` [P, C, K] (transposed: its [P, K, C], the fused
  backward's operand, without a transpose copy), in the kernels: equal to it to float32
  rounding. C and K multiples of `lanes()`, tile 2, 4 or 5; call `available()` first."""
  if tile not in (2, 4, 5):
    raise ValueError(f"Winograd tiles are 2, 4 or 5, got {tile}")
  _, _, c, k = kernel.shape
  planes = (tile + 2) ** 2
  shape = (planes, k, c) if transposed else (planes, c, k)
  return call("fashion_jax_filter_transform", jax.ShapeDtypeStruct(shape, jnp.float32), kernel,
              transposed=np.int32(transposed))


def filter_transform_grad(du: jax.Array) -> jax.Array:
  """`winograd.filter_transform_grad(du)` in the kernels: the kernel's gradient [3, 3, C, K]."""
  _, c, k = du.shape
  return call("fashion_jax_filter_transform_grad", jax.ShapeDtypeStruct((3, 3, c, k), jnp.float32),
              du)


def pooled(x, channels: int) -> jax.ShapeDtypeStruct:
  """The shape of a 3x3 VALID conv with `channels` outputs + 2x2 pool of x, float32."""
  n, h, w, _ = x.shape
  return jax.ShapeDtypeStruct((n, (h - 2) // 2, (w - 2) // 2, channels), jnp.float32)


def pooled_shapes(x, kernel):
  """`pooled` and the argmax taps' int8 of the same shape."""
  y = pooled(x, kernel.shape[-1])
  return y, jax.ShapeDtypeStruct(y.shape, jnp.int8)


# The forward kernels return the pooled (and ReLU'd) output and, per output, the tap its
# gradient flows to: 0-3 (the window's first maximum), or 4 where the ReLU is off (no tap).

# Direct kernel (few input channels).

def _direct_fwd(x, kernel, bias, relu):
  y, which = call("fashion_jax_conv_pool_fwd", pooled_shapes(x, kernel), x, kernel, bias,
                  relu=np.int32(relu))
  return y, (x, kernel, which)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _direct(x, kernel, bias, relu):
  return _direct_fwd(x, kernel, bias, relu)[0]


def _direct_bwd(relu, residuals, dy):
  del relu  # In `which`.
  x, kernel, which = residuals
  dkernel, dbias = call("fashion_jax_conv_pool_bwd",
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


# Winograd kernels (wide inputs): the whole layer fused, a block of tiles at a time in cache.

def _winograd_forward(x, kernel, bias, relu):
  y, which = call("fashion_jax_winograd_conv_pool_fwd", pooled_shapes(x, kernel), x,
                  filter_transform(kernel, 2), bias, relu=np.int32(relu))
  return y, (x, kernel, which)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _winograd(x, kernel, bias, relu):
  return _winograd_forward(x, kernel, bias, relu)[0]


def _winograd_bwd(relu, residuals, dy):
  del relu  # In `which`.
  x, kernel, which = residuals
  ut = filter_transform(kernel, 2, transposed=True)
  dx, du, dbias = call("fashion_jax_winograd_conv_pool_bwd",
                       (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        jax.ShapeDtypeStruct((ut.shape[0],) + kernel.shape[2:], jnp.float32),
                        jax.ShapeDtypeStruct(kernel.shape[-1:], jnp.float32)),
                       x, ut, which, dy)
  return dx, filter_transform_grad(du), dbias


_winograd.defvjp(_winograd_forward, _winograd_bwd)


def main(argv: list[str] | None = None) -> int:
  """`python -m fashion_jax.kernels.native [--all]`: builds the kernels now (e.g. in a Docker image
  or a Colab setup cell) and says where they are, or why they are unavailable. `--all` builds
  every target of this architecture too, so the cache serves any CPU of it (only the ones this
  CPU runs can be loaded and checked here)."""
  argv = sys.argv[1:] if argv is None else argv
  if argv not in ([], ["--all"]):
    print("usage: python -m fashion_jax.kernels.native [--all]", file=sys.stderr)
    return 2
  logging.set_verbosity(logging.INFO)
  failed = False
  if argv == ["--all"]:
    include = jax.ffi.include_dir()
    for target in native_build.targets():
      try:
        width = native_build.lanes_for(target)
        path = native_build.build(target, width, include)
        if not path.is_relative_to(native_build.cache_dir()):  # A temporary folder, gone at exit.
          raise NativeUnavailable(f"{native_build.cache_dir()} is not writable or not yours alone: "
                                  "set FASHION_JAX_CACHE_DIR to a folder of your own")
        print(f"{target.name} ({width} lanes): {path}")
      except (OSError, subprocess.SubprocessError, NativeUnavailable, ValueError) as e:
        print(f"{target.name}: not built: {type(e).__name__}: {e}")
        failed = True
  reason = _load()
  if reason is not None:
    print(f"fashion_jax native CPU kernels: unavailable: {reason}")
    return 1
  print(f"fashion_jax native CPU kernels: ready for this CPU (target={_loaded['target']} "
        f"lanes={_loaded['lanes']} isa={_loaded['isa']}; {_loaded['library']})")
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
