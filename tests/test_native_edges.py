"""The native kernels at the edges of their inputs: NaN in the images (the pool must propagate it
as XLA's max does) and empty batches (every gradient zeros, as lax's)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from fashion_jax.kernels import batchnorm, dense, native, ops, plain_conv, two_layers
from tests.conftest import ROOT, require_native

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module", autouse=True)
def built():
  require_native()


def _ref(x, k, b, relu=False):
  y = lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN) + b
  if relu:
    y = jax.nn.relu(y)
  return lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _xla(x, k, b, relu=False):
  """The layer as "auto" runs it without the kernels: lax's convolution, the bias, the ReLU and
  the pool as the max of its four taps (jnp.maximum: NaN wins, as XLA's max is specified).
  (lax.reduce_window's max is no reference for NaN on CPU: jax 0.10.2 gives -inf, its initial
  value, for a window of four NaN in a [2, 10, 8, 32] array, NaN for the same window alone.)"""
  y = lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN) + b
  return ops.max_pool_2x2_select(jax.nn.relu(y) if relu else y)


def _inputs(seed, shape, cout):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=shape).astype(np.float32)
  k = (rng.standard_normal((3, 3, shape[-1], cout)) * 0.3).astype(np.float32)
  return x, k, rng.standard_normal(cout).astype(np.float32)


def _with_nans(x):
  """x with NaN at pixels whose conv outputs are only a pooling window's later taps (the last
  row and column: tap 2 or 3) and at ones a window's first tap sees too."""
  x = x.copy()
  n, h, w, _ = x.shape
  x[0, h - 1, w - 1, 0] = np.nan  # Only tap 3 of the last window (h, w even).
  x[n - 1, h - 1, 3, 0] = np.nan  # Taps 2 and 3 of the last row's windows.
  x[n - 1, 2, w - 1, x.shape[-1] - 1] = np.nan  # Taps 1 and 3 of the last column's.
  x[0, 2, 2, 0] = np.nan  # Every tap of some windows.
  return x


@pytest.mark.parametrize("cin,cout", [(1, 32), (3, 16), (16, 32)], ids=["direct", "direct3",
                                                                        "winograd"])
@pytest.mark.parametrize("relu", [False, True])
def test_a_nan_in_the_image_reaches_the_pooled_output_as_in_lax(cin, cout, relu):
  """Where the XLA formulation's pooled output is NaN the kernels' is too, and only there (the
  pool's max propagates NaN; it took the later taps' NaN for smaller than any number, so a NaN
  at an image's last row or column gave finite outputs, a finite loss, and a step that
  on_nonfinite did not stop); elsewhere the outputs are lax's."""
  x, k, b = _inputs(0, (2, 12, 10, cin), cout)
  if not native.supports(jnp.asarray(x), jnp.asarray(k)):
    pytest.skip(f"{cout} channels are not a multiple of this build's width")
  x = _with_nans(x)
  got = np.asarray(jax.jit(functools.partial(native.conv3x3_pool2, relu=relu))(x, k, b))
  want = np.asarray(_xla(x, k, b, relu))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  assert np.isnan(want[:, -1]).any() and np.isnan(want[:, :, -1]).any()
  finite = ~np.isnan(want)
  np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)
  loss = jax.jit(lambda *a: jnp.sum(native.conv3x3_pool2(*a, relu=relu)))(x, k, b)
  assert np.isnan(loss)


def test_a_nan_in_the_image_reaches_the_two_layer_output():
  """A NaN at an image's last row and column (only the last pooling window's tap 3 in the
  first layer) makes that image's outputs NaN wherever the XLA formulation's are; the other
  image's are lax's."""
  x, k1, b1 = _inputs(1, (2, 18, 14, 1), 32)  # h: 8 x 6, all read by the second layer.
  _, k2, b2 = _inputs(2, (1, 4, 4, 32), 32)
  k2 = k2 * 0.3
  if not two_layers.supports_two_layers(jnp.asarray(x), jnp.asarray(k1), jnp.asarray(k2)):
    pytest.skip("32 channels are not a multiple of this build's width")
  assert two_layers.two_layer_tile(x.shape) == 2
  x[0, -1, -1, 0] = np.nan
  args = (x, k1, b1, k2, b2)
  got = np.asarray(jax.jit(functools.partial(two_layers.conv3x3_pool2_twice, relu=True))(*args))
  want = np.asarray(_xla(_xla(x, k1, b1, True), k2, b2, True))
  assert np.isnan(want[0]).any() and not np.isnan(want[1]).any()
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


def _zeros_like_lax(f, ref, args, argnums):
  """The gradients of sum(f(*args)) with an empty batch: lax's (zeros), twice (a second call
  reuses the first's freed buffers: uninitialized memory was often zeros on the first)."""
  want = jax.grad(lambda *a: jnp.sum(ref(*a)), argnums=argnums)(*args)
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=argnums))
  for _ in range(3):
    for got, expected in zip(grad(*args), want):
      assert got.shape == expected.shape
      np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("hw,cin,cout", [((10, 10), 1, 32), ((10, 10), 16, 32),
                                         ((13, 11), 32, 16)])
def test_an_empty_batch_has_zero_conv_pool_gradients(hw, cin, cout):
  x, k, b = _inputs(3, (0, *hw, cin), cout)
  if not native.supports(jnp.asarray(x), jnp.asarray(k)):
    pytest.skip(f"{cout} channels are not a multiple of this build's width")
  _zeros_like_lax(native.conv3x3_pool2, _ref, (x, k, b), (0, 1, 2))


@pytest.mark.parametrize("hw,cin", [((10, 10), 16), ((14, 14), 16), ((10, 10), 2)],
                         ids=["f2", "f4", "direct"])
def test_an_empty_batch_has_zero_plain_conv_gradients(hw, cin):
  x, k, _ = _inputs(4, (0, *hw, cin), 32)
  if not plain_conv.supports(jnp.asarray(x), jnp.asarray(k)):
    pytest.skip("32 channels are not a multiple of this build's width")
  conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN)
  _zeros_like_lax(plain_conv.conv3x3, conv, (x, k), (0, 1))


@pytest.mark.parametrize("hw", [(28, 28), (10, 10)], ids=["f5", "f2"])
def test_an_empty_batch_has_zero_two_layer_gradients(hw):
  x, k1, b1 = _inputs(5, (0, *hw, 1), 32)
  _, k2, b2 = _inputs(6, (1, 4, 4, 32), 32)
  if not two_layers.supports_two_layers(jnp.asarray(x), jnp.asarray(k1), jnp.asarray(k2)):
    pytest.skip("32 channels are not a multiple of this build's width")
  ref = lambda x, k1, b1, k2, b2: _ref(_ref(x, k1, b1), k2, b2)
  _zeros_like_lax(two_layers.conv3x3_pool2_twice, ref, (x, k1, b1, k2, b2), (0, 1, 2, 3, 4))


@pytest.mark.parametrize("b,d", [(0, 64), (5, 0)], ids=["no_rows", "no_contraction"])
def test_dense_with_an_empty_axis_is_zeros_like_lax(b, d):
  h = 2 * native.lanes()
  rng = np.random.default_rng(7)
  x = rng.standard_normal((b, d)).astype(np.float32)
  w = rng.standard_normal((d, h)).astype(np.float32)
  for _ in range(3):
    np.testing.assert_array_equal(jax.jit(dense.matmul)(x, w), np.zeros((b, h), np.float32))
  _zeros_like_lax(dense.matmul, jnp.dot, (x, w), (0, 1))


@pytest.mark.parametrize("cin", [1, 16], ids=["direct", "winograd"])
def test_a_bias_of_one_value_broadcasts_as_in_lax_and_a_short_one_is_refused(cin):
  """A bias of shape () or [1] adds to every channel, as `y + bias` does (the kernels read
  Cout floats from it: past its end, outputs garbage or NaN), its gradient lax's; one of the
  wrong length is a ValueError, not a read past it."""
  x, k, _ = _inputs(8, (2, 10, 10, cin), 32)
  if not native.supports(jnp.asarray(x), jnp.asarray(k)):
    pytest.skip("32 channels are not a multiple of this build's width")
  for b in (np.float32(0.25), np.full((1,), 0.25, np.float32)):
    np.testing.assert_allclose(native.conv3x3_pool2(x, k, b), _ref(x, k, b), rtol=1e-5,
                               atol=1e-5)
    loss = lambda f: jax.grad(lambda b: jnp.sum(f(x, k, b) ** 2))(b)
    got, want = loss(native.conv3x3_pool2), loss(_ref)
    assert got.shape == b.shape
    np.testing.assert_allclose(got, want, rtol=1e-4)
  with pytest.raises(ValueError, match="bias must have shape"):
    native.conv3x3_pool2(x, k, np.zeros(16, np.float32))
  x1, k1, b1 = _inputs(9, (2, 18, 14, 1), 32)
  _, k2, b2 = _inputs(10, (1, 4, 4, 32), 32)
  with pytest.raises(ValueError, match="bias must have shape"):
    two_layers.conv3x3_pool2_twice(x1, k1, b1, k2, b2[:16])
  y = jnp.asarray(x[..., :1].repeat(32, -1))
  with pytest.raises(ValueError, match="scale must have shape"):
    batchnorm.batch_norm_relu(y, np.ones(16, np.float32), b2, epsilon=1e-5)


# Each backward handler called with one output (or input) shorter than the shapes say, in a
# subprocess: a kernel that wrote past it corrupted the heap ("double free or corruption").
_SHORT_BUFFERS = r"""
import jax, jax.numpy as jnp, numpy as np
from fashion_jax.kernels import native, two_layers
assert native.available(), native._load()
f32, rng = jnp.float32, np.random.default_rng(0)
S = lambda *shape: jax.ShapeDtypeStruct(shape, f32)
r = lambda *shape: jnp.asarray(rng.standard_normal(shape), f32)
i8 = lambda *shape: jnp.zeros(shape, jnp.int8)
C = 32
cases = {
    "conv_pool_bwd dbias": ("fashion_jax_conv_pool_bwd", (S(3, 3, 1, C), S(1)),
                            (r(2, 10, 10, 1), r(3, 3, 1, C), i8(2, 4, 4, C), r(2, 4, 4, C)), {}),
    "winograd_conv_pool_bwd db": (
        "fashion_jax_winograd_conv_pool_bwd", (S(2, 10, 10, C), S(16, C, C), S(1)),
        (r(2, 10, 10, C), r(16, C, C), i8(2, 4, 4, C), r(2, 4, 4, C)), {}),
    "winograd_conv_bwd dx": ("fashion_jax_winograd_conv_bwd", (S(1), S(16, C, C)),
                             (r(2, 10, 10, C), r(16, C, C), r(2, 8, 8, C)), {}),
    "bn_relu_grad_sums sums": ("fashion_jax_bn_relu_grad_sums", S(1),
                               (r(2, 4, 4, C), r(2, 4, 4, C), r(3, C)), {"pad": np.int32(0)}),
    "bn_relu_grad dy": ("fashion_jax_bn_relu_grad", S(1),
                        (r(2, 4, 4, C), r(2, 4, 4, C), r(6, C)), {"pad": np.int32(0)}),
    "bn_relu_pool_grad_sums sums": ("fashion_jax_bn_relu_pool_grad_sums", S(1),
                                    (r(2, 4, 4, C), r(2, 2, 2, C), i8(2, 2, 2, C), r(3, C)), {}),
    "bn_relu_pool_grad dy": ("fashion_jax_bn_relu_pool_grad", S(1),
                             (r(2, 4, 4, C), r(2, 2, 2, C), i8(2, 2, 2, C), r(6, C)), {}),
    "dense_bwd dw": ("fashion_jax_dense_bwd", (S(4, 8), S(1)), (r(4, 8), r(8, C), r(4, C)), {}),
    "adam m": ("fashion_jax_adam", (S(64), S(1), S(64)),
               (r(64), r(64), r(64), jnp.ones(64, f32), jnp.asarray([-1e-3, 0.1, 0.01, 0], f32)),
               {k: np.float32(v) for k, v in dict(b1=0.9, b2=0.999, one_minus_b1=0.1,
                one_minus_b2=0.001, eps=1e-8, eps_root=0, weight_decay=0).items()}),
}
for hw in ((18, 14), (28, 28)):  # F(2x2, 3x3) and F(5x5, 3x3).
  x, k1, b1, k2, b2 = r(2, *hw, 1), r(3, 3, 1, C), r(C), r(3, 3, C, C) * 0.1, r(C)
  y, (_, _, _, _, _, h, w1, w2) = two_layers._two_layers_forward(x, k1, b1, k2, b2, True)
  tile = np.int32(two_layers.two_layer_tile(x.shape))
  for short in (1, 3):  # db1, db2
    shapes = [S(*k1.shape), S(C), S(*k2.shape), S(C)]
    shapes[short] = S(1)
    cases[f"two_layer_bwd tile {tile} {('db1', 'db2')[short // 2]}"] = (
        "fashion_jax_two_layer_bwd", tuple(shapes), (x, h, w1, k2, w2, jnp.ones_like(y)),
        {"tile": tile})
for name, (target, shapes, args, attributes) in cases.items():
  try:
    jax.block_until_ready(native.call(target, shapes, *args, **attributes))
    print(name, "accepted", flush=True)
  except Exception as e:  # pylint: disable=broad-except
    print(name, "refused" if "INVALID_ARGUMENT" in str(e) else f"failed: {e}", flush=True)
print("done")
"""


def test_the_kernels_refuse_a_short_bias_rather_than_read_past_it():
  """Called directly (`native.call`, past the wrappers' checks), the pooled kernels check their
  bias and argmax against the shapes: an INVALID_ARGUMENT error, not a read past the bias. So
  does every backward handler with each output (or input) whose size it would otherwise assume
  (two_layer_bwd wrote K floats into a db2 of shape (1,): "double free or corruption"), in a
  subprocess, so a write past a buffer fails this test rather than ending pytest."""
  x, k, b = _inputs(11, (2, 10, 10, 1), 32)
  if not native.supports(jnp.asarray(x), jnp.asarray(k)):
    pytest.skip("32 channels are not a multiple of this build's width")
  shapes = native.pooled_shapes(x, k)
  with pytest.raises(Exception, match="expected bias"):
    jax.block_until_ready(native.call("fashion_jax_conv_pool_fwd", shapes, x, k, b[:1],
                                      relu=np.int32(0)))
  x16, k16, _ = _inputs(12, (2, 10, 10, 16), 32)
  with pytest.raises(Exception, match="expected bias"):
    jax.block_until_ready(native.call("fashion_jax_winograd_conv_pool_fwd",
                                      native.pooled_shapes(x16, k16), x16,
                                      native.filter_transform(k16, 2), b[:1], relu=np.int32(0)))
  x1, k1, b1 = _inputs(13, (2, 18, 14, 1), 32)
  _, k2, b2 = _inputs(14, (1, 4, 4, 32), 32)
  with pytest.raises(Exception, match="expected b1"):
    jax.block_until_ready(native.call(
        "fashion_jax_two_layer_fwd", native.pooled_shapes(native.pooled(x1, 32), k2), x1, k1,
        b1, k2, b2[:1], relu1=np.int32(0), relu2=np.int32(0), tile=np.int32(2)))
  proc = subprocess.run([sys.executable, "-c", _SHORT_BUFFERS], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = proc.stdout.splitlines()
  assert proc.returncode == 0 and lines[-1:] == ["done"], (proc.stdout, proc.stderr[-3000:])
  assert len(lines) == 14 and all(line.endswith(" refused") for line in lines[:-1]), lines
