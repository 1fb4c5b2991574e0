"""Convolution and pooling formulations, and the choice between them.

XLA lowers `lax.conv_general_dilated` and `lax.reduce_window` (and especially
their gradients) to slow loops on CPU, while it runs large matrix multiplies
near peak. The same math written as one im2col matmul and a reshape+max runs
several times faster there (numbers in BENCHMARKS.md), and a 3x3 convolution
followed by 2x2 max-pooling runs faster still as Winograd's F(2x2, 3x3)
(`fashion_jax.kernels.winograd`), and fastest with its memory-bound parts in C++
(`fashion_jax.kernels.native`). On TPU and GPU XLA's own convolution is the right
choice. Everything here computes the reference math; tests compare outputs and
gradients with `lax`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fashion_jax.kernels import native
from fashion_jax.kernels import plain_conv
from fashion_jax.kernels import two_layers
from fashion_jax.kernels import winograd

CONV_IMPLS = ("auto", "xla", "im2col", "winograd", "native")
POOL_IMPLS = ("auto", "xla", "reshape", "select")
FAST_POOL = "select"  # what "auto" picks on CPU
WINOGRAD_MIN_CHANNELS = 8  # See cpu_auto_conv_impl.


def on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def resolve_impl(impl: str, choices: Sequence[str], fast: str) -> str:
  """Maps "auto" to the fast formulation on CPU and to "xla" elsewhere."""
  if impl not in choices:
    raise ValueError(f"unknown implementation {impl!r}; choose one of {choices}")
  if impl != "auto":
    return impl
  return fast if on_cpu() else "xla"


def _im2col_patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """[B,H,W,C] -> [B,H-kh+1,W-kw+1,kh*kw*C], patch index (i, j, c) row-major.

  The order matches an HWIO kernel reshaped to [kh*kw*C, O].
  """
  _, h, w, _ = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  shifted = [x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]
  return jnp.concatenate(shifted, axis=-1)


def conv2d_im2col(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """VALID, stride-1 NHWC x HWIO convolution as a single matmul."""
  kh, kw, cin, cout = kernel.shape
  patches = _im2col_patches(x, kh, kw)
  b, ho, wo, k = patches.shape
  y = jnp.dot(patches.reshape(b * ho * wo, k), kernel.reshape(kh * kw * cin, cout),
              precision=precision)
  return y.reshape(b, ho, wo, cout)


def _normalize_padding(padding, kernel_hw):
  if isinstance(padding, str):
    if padding == "VALID":
      return ((0, 0), (0, 0))
    if padding == "SAME":
      pads = []
      for k in kernel_hw:
        total = k - 1
        pads.append((total // 2, total - total // 2))
      return tuple(pads)
    return None
  return tuple(tuple(p) for p in padding)


def _simple_conv_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, batch_group_count,
                      preferred_element_type):
  """The ((top, bottom), (left, right)) padding of a convolution the fast paths cover
  (2-D, NHWC/HWIO, stride 1, no dilation, no groups), or None."""
  simple = (
      lhs.ndim == 4
      and tuple(window_strides) == (1, 1)
      and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
      and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
      and feature_group_count == 1 and batch_group_count == 1
      and preferred_element_type is None
      and _is_nhwc(dimension_numbers, lhs.ndim))
  return _normalize_padding(padding, rhs.shape[:2]) if simple else None


def _pad_images(x: jax.Array, pads) -> jax.Array:
  """x [N, H, W, C] with ((top, bottom), (left, right)) rows and columns of zeros added, or cut
  where a padding is negative, as `lax.conv_general_dilated` takes them. (`jnp.pad` refuses
  negative widths, and XLA:CPU's own convolution with a negative padding reads memory it never
  wrote: NaNs or garbage in some calls, jax 0.10.2.)"""
  if any(p != (0, 0) for p in pads):
    (top, bottom), (left, right) = pads
    x = x[:, max(-top, 0):x.shape[1] - max(-bottom, 0), max(-left, 0):x.shape[2] - max(-right, 0)]
    x = jnp.pad(x, ((0, 0), (max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0)), (0, 0)))
  return x


def conv_general_dilated_im2col(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None,
                                feature_group_count=1, batch_group_count=1,
                                precision=None, preferred_element_type=None):
  """Drop-in for `lax.conv_general_dilated` (as `nn.Conv` calls it).

  Takes the im2col path for the cases it covers (2-D, NHWC/HWIO, stride 1, no
  dilation, no groups) and defers to `lax` for everything else.
  """
  pads = _simple_conv_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count, batch_group_count,
                           preferred_element_type)
  if pads is None:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  lhs = _pad_images(lhs, pads)
  return conv2d_im2col(lhs, rhs, precision=precision)


def _winograd_conv(conv3x3, lhs, rhs, window_strides, padding, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                   batch_group_count=1, precision=None, preferred_element_type=None):
  args = (lhs, rhs, window_strides, padding)
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)
  pads = _simple_conv_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count, batch_group_count,
                           preferred_element_type)
  if pads is None or tuple(rhs.shape[:2]) != (3, 3):
    return conv_general_dilated_im2col(*args, **kwargs)
  lhs = _pad_images(lhs, pads)
  return conv3x3(lhs, rhs)


def conv_general_dilated_winograd(*args, **kwargs):
  """Drop-in for `lax.conv_general_dilated`: Winograd F(2x2, 3x3) for 3x3 kernels.

  Other kernel sizes, strides and layouts take the im2col path (or `lax`).
  """
  return _winograd_conv(winograd.conv3x3, *args, **kwargs)


def _native_conv3x3(x, kernel):
  if plain_conv.supports(x, kernel):
    return plain_conv.conv3x3(x, kernel)
  if cpu_auto_conv_impl(x) == "winograd":
    return winograd.conv3x3(x, kernel)
  return conv2d_im2col(x, kernel)


def conv_general_dilated_native(lhs, rhs, *args, **kwargs):
  """Drop-in for `lax.conv_general_dilated` on the native kernels where they apply
  (`plain_conv`: float32, output channels in multiples of the kernels' vector width,
  `native.lanes()`, and few input channels or a multiple of it); other inputs take "auto"'s CPU
  choice."""
  if not _native_fits(lhs, rhs):
    return conv_general_dilated_cpu_auto(lhs, rhs, *args, **kwargs)
  return _winograd_conv(_native_conv3x3, lhs, rhs, *args, **kwargs)


def _native_fits(lhs, rhs) -> bool:
  cin = lhs.shape[-1]
  return (lhs.dtype == jnp.float32 and native.fits_lanes(rhs.shape[-1])
          and (cin < native.DIRECT_MAX_CHANNELS or native.fits_lanes(cin)))


def _is_nhwc(dimension_numbers, ndim) -> bool:
  if dimension_numbers is None or ndim != 4:
    return False
  dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
  return dn == lax.conv_dimension_numbers((1,) * 4, (1,) * 4, ("NHWC", "HWIO", "NHWC"))


def max_pool_2x2_reshape(x: jax.Array) -> jax.Array:
  """2x2/stride-2 VALID max pooling on NHWC as a reshape and a max.

  Odd trailing rows/columns are dropped, as VALID pooling does.
  """
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[:, :2 * h2, :2 * w2, :]
  return jnp.max(x.reshape(b, h2, 2, w2, 2, c), axis=(2, 4))


def _pool_taps(x: jax.Array):
  """The four taps of each 2x2 window, in `reduce_window`'s scan order."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2, :]
  return (x[:, 0::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 0::2, :], x[:, 1::2, 1::2, :])


@jax.custom_vjp
def max_pool_2x2_select(x: jax.Array) -> jax.Array:
  """2x2/stride-2 VALID max pooling whose gradient matches `lax.reduce_window`.

  The forward is the max of four strided slices, one elementwise pass that XLA
  fuses with the bias add before it and the ReLU after it. The backward sends
  each window's gradient to the first maximal tap in row-major order, as the
  transpose of `reduce_window` (select-and-scatter with `>=`) does, so ties,
  which are common where a Fashion-MNIST image is blank, agree with `lax` too.
  (The autodiff of `max_pool_2x2_reshape` splits a tie's gradient evenly.)
  """
  a, b, c, d = _pool_taps(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _pool_select_fwd(x):
  a, b, c, d = _pool_taps(x)
  y = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
  # Which tap won, as one byte per output: a quarter of x's size in bytes/16.
  idx = jnp.where(a == y, 0, jnp.where(b == y, 1, jnp.where(c == y, 2, 3))).astype(jnp.int8)
  return y, (idx, x.shape)


def _pool_select_bwd(res, dy):
  idx, shape = res
  return (winograd.unpool_to_argmax(dy, idx, shape),)


max_pool_2x2_select.defvjp(_pool_select_fwd, _pool_select_bwd)


def max_pool_2x2(x: jax.Array, impl: str = "auto") -> jax.Array:
  impl = resolve_impl(impl, POOL_IMPLS, fast=FAST_POOL)
  if impl == "reshape":
    return max_pool_2x2_reshape(x)
  if impl == "select":
    return max_pool_2x2_select(x)
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def cpu_auto_conv_impl(x: jax.Array) -> str:
  """What "auto" runs on CPU for a 3x3 conv on NHWC `x` (BENCHMARKS.md).

  Winograd from WINOGRAD_MIN_CHANNELS input channels up (for fewer its
  transforms cost more than they save), and only in float32: its transforms add
  and subtract inputs, too lossy in bfloat16. im2col otherwise.
  """
  if x.shape[-1] >= WINOGRAD_MIN_CHANNELS and x.dtype == jnp.float32:
    return "winograd"
  return "im2col"


def _native_wanted() -> bool:
  """"auto" takes the native kernels when they are built and the step runs on one device
  (under a multi-device mesh XLA would gather the batch onto every device for them)."""
  return jax.device_count() == 1 and native.available()


def check_native() -> None:
  """Raises a ValueError saying why conv_impl="native" cannot run here, if it cannot."""
  if not on_cpu():
    raise ValueError("conv_impl='native' runs on CPU only; use 'auto' or 'xla' on "
                     f"{jax.default_backend()}")
  if not native.available():
    raise ValueError("conv_impl='native' needs the native CPU kernels, which are unavailable "
                     "here (see the warning above); use conv_impl='auto'")


def native_chosen(conv_impl: str) -> bool:
  """Whether a model with this conv_impl runs its fused native ops (the two-layer op, BatchNorm +
  ReLU: `fashion_jax.kernels.batchnorm`): "native" (ValueError off CPU or without the kernels),
  or "auto" on CPU where they are wanted (`_native_wanted`)."""
  if conv_impl == "native":
    check_native()
    return True
  return conv_impl == "auto" and on_cpu() and _native_wanted()


def native_for_inference(conv_impl: str) -> bool:
  """Whether evaluation and inference take the native kernels: where training may ("auto",
  "native"), on CPU with one device, and only if they load without compiling
  (`native.available_without_building`). (Their forward is 1.4-2x XLA's convolutions'.)"""
  return (conv_impl in ("auto", "native") and on_cpu() and jax.device_count() == 1
          and native.available_without_building())


def conv_general_dilated_cpu_auto(lhs, rhs, *args, **kwargs):
  """Drop-in for `lax.conv_general_dilated`: "auto" on CPU: the native kernels where they
  apply and are wanted (`conv_general_dilated_native`), else `cpu_auto_conv_impl`'s choice."""
  if _native_fits(lhs, rhs) and _native_wanted():
    return _winograd_conv(_native_conv3x3, lhs, rhs, *args, **kwargs)
  if cpu_auto_conv_impl(lhs) == "winograd":
    return conv_general_dilated_winograd(lhs, rhs, *args, **kwargs)
  return conv_general_dilated_im2col(lhs, rhs, *args, **kwargs)


def cpu_auto_conv_pool_impl(x: jax.Array, kernel: jax.Array) -> str:
  """What "auto" runs on CPU for a 3x3 conv + 2x2 max-pool (BENCHMARKS.md).

  The fused native kernels (`fashion_jax.kernels.native`: direct for few input
  channels, Winograd for many) where they apply and are wanted
  (`_native_wanted`); otherwise `cpu_auto_conv_impl`.
  """
  if native.supports(x, kernel) and _native_wanted():
    return "native"
  return cpu_auto_conv_impl(x)


def conv_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, conv_impl: str = "auto",
              pool_impl: str = "auto", relu: bool = False) -> jax.Array:
  """max_pool_2x2(conv_3x3_valid(x, kernel) + bias): NHWC x, HWIO kernel; then the ReLU with
  `relu` (fused into the native kernels, `jax.nn.relu` after the others).

  "winograd" and "native" compute the pair as one fused op
  (`fashion_jax.kernels.winograd`, `fashion_jax.kernels.native`; "native" only where
  `native.supports` the shapes, else as "auto" on CPU); the other formulations
  run the convolution, the bias and the pooling in turn. On CPU "auto" takes
  the fused ops where they win (`cpu_auto_conv_pool_impl`).
  """
  if conv_impl == "native":
    check_native()
    conv_impl = "native" if native.supports(x, kernel) else "auto"
  impl = cpu_auto_conv_pool_impl(x, kernel) if conv_impl == "auto" and on_cpu() else conv_impl
  impl = resolve_impl(impl, CONV_IMPLS, fast="im2col")
  if impl == "native":
    return native.conv3x3_pool2(x, kernel, bias, relu=relu)
  if impl == "winograd":
    y = winograd.conv3x3_pool2(x, kernel, bias)
  else:
    conv = conv_general_dilated_im2col if impl == "im2col" else lax.conv_general_dilated
    y = conv(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = max_pool_2x2(y + bias, impl=pool_impl)
  return jax.nn.relu(y) if relu else y


def conv_pool_twice(x: jax.Array, k1: jax.Array, b1: jax.Array, k2: jax.Array, b2: jax.Array,
                    conv_impl: str = "auto", pool_impl: str = "auto",
                    relu: bool = False) -> jax.Array:
  """conv_pool(conv_pool(x, k1, b1, ...), k2, b2, ...) (the classic CNN's two layers).

  Where both layers would run the native kernels ("native", or "auto" on CPU when they are
  wanted) and `two_layers.supports_two_layers` the shapes, one native op computes the pair with
  the first layer's output kept in cache (`two_layers.conv3x3_pool2_twice`); otherwise the two
  layers run in turn, as `conv_pool` runs each.
  """
  if native_chosen(conv_impl) and two_layers.supports_two_layers(x, k1, k2):
    return two_layers.conv3x3_pool2_twice(x, k1, b1, k2, b2, relu=relu)
  h = conv_pool(x, k1, b1, conv_impl, pool_impl, relu=relu)
  return conv_pool(h, k2, b2, conv_impl, pool_impl, relu=relu)
