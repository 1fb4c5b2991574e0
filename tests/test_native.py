"""The native (C++ / XLA FFI) fused conv+pool kernel against lax, and its fallbacks."""

import functools
import math
import os
from pathlib import Path
import platform
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from fashion_jax.kernels import (batchnorm, dense, dropout, native, native_build, ops, plain_conv,
                                 two_layers, winograd)
from tests.conftest import ROOT, require_native

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module", autouse=True)
def built():
  require_native()  # Not a skip where a C++ compiler exists: there the kernels must build.


def _ref(x, k, b, relu=False):
  y = lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN) + b
  if relu:  # Before the pool, as the model is written; the kernels fuse it after.
    y = jax.nn.relu(y)
  return lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _fits(cin, cout):
  return native.fits_lanes(cout) and (cin < native.DIRECT_MAX_CHANNELS or native.fits_lanes(cin))


def _inputs(seed, batch, hw, cin, cout):
  rng = np.random.default_rng(seed)  # numpy: eager jax.random compiles for seconds per shape.
  x = rng.uniform(size=(batch, *hw, cin)).astype(np.float32)
  x[0, :4] = 0.0  # A blank band: all four outputs of those windows tie.
  k = (rng.standard_normal((3, 3, cin, cout)) * 0.3).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(k), jnp.asarray(rng.standard_normal(cout), jnp.float32)


@pytest.mark.parametrize("batch,hw,cin,cout", [
    (5, (28, 28), 1, 32),   # The CNN's first layer.
    (11, (13, 11), 1, 8),   # Odd sizes (last conv row/column dropped); more images than chunks.
    (3, (10, 9), 3, 16),    # RGB-like, compile-time channel count.
    (2, (6, 7), 5, 24),     # Generic (run-time) channel count.
    (4, (13, 13), 32, 64),  # The CNN's second layer: Winograd kernels.
    (3, (8, 11), 8, 16),    # Winograd, even/odd sizes.
    (2, (9, 9), 16, 24),    # Winograd weight gradient's 4-row and 8-column remainders.
    (1, (4, 4), 4, 8),      # Smallest input: one pooling window.
    (1, (4, 4), 8, 8),      # The same for Winograd.
    (2, (6, 7), 5, 48),     # 16 lanes (AVX-512): generic channel count, three blocks.
    (2, (9, 9), 16, 48)])   # 16 lanes: the weight gradient's row and column remainders.
@pytest.mark.parametrize("relu", [False, True], ids=["conv_pool", "conv_pool_relu"])
def test_outputs_and_grads_match_lax(batch, hw, cin, cout, relu):
  x, k, b = _inputs(batch, batch, hw, cin, cout)
  if not _fits(cin, cout):  # Channels not a multiple of this build's vector width.
    assert not native.supports(x, k)
    with pytest.raises(ValueError, match="does not support"):
      native.conv3x3_pool2(x, k, b)
    return
  fused = functools.partial(native.conv3x3_pool2, relu=relu)
  ref = functools.partial(_ref, relu=relu)
  y = jax.jit(fused)(x, k, b)
  want = ref(x, k, b)
  assert y.shape == want.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  if relu:  # Both sides of the ReLU are exercised.
    assert 0.05 < np.mean(np.asarray(want) == 0) < 0.95
  r = jnp.asarray(np.random.default_rng(9).standard_normal(want.shape), jnp.float32)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * r), argnums=(0, 1, 2)))(x, k, b)
           for f in (ref, fused)]
  for got, expected in zip(grads[1], grads[0]):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,hw,cin,c,k,tile", [
    (3, (28, 28), 1, 32, 64, 5),  # The CNN's two layers (F(5x5, 3x3): 2x2 tiles an image).
    (17, (28, 28), 2, 16, 16, 5),  # Groups of images cut short by the gradient's chunks.
    (2, (48, 28), 1, 16, 32, 5),  # 4x2 tiles an image, groups of 4.
    (2, (13, 11), 3, 16, 48, 2),  # Odd sizes, several input channels, three output blocks (16 lanes).
    (17, (10, 10), 2, 16, 16, 2)])  # More images than the gradient's chunks; the smallest second layer.
@pytest.mark.parametrize("relu", [False, True], ids=["two_layers", "two_layers_relu"])
def test_two_layers_match_lax_and_the_separate_kernels(batch, hw, cin, c, k, tile, relu):
  """The two conv + pool layers as one op: with F(2x2, 3x3) outputs bitwise the two layers' own
  kernels', with F(5x5, 3x3) (pooled sides multiples of 5) equal to theirs to its rounding; every
  gradient (the input's too, through the separate ops) equal to theirs and to lax's to rounding."""
  x, k1, b1 = _inputs(batch, batch, hw, cin, c)
  _, k2, b2 = _inputs(batch + 1, 1, (4, 4), c, k)
  k2 = k2 * 0.3
  args = (x, k1, b1, k2, b2)
  if not (native.fits_lanes(c) and native.fits_lanes(k)):
    assert not two_layers.supports_two_layers(x, k1, k2)
    return
  assert two_layers.supports_two_layers(x, k1, k2)
  assert two_layers.two_layer_tile(x.shape) == tile
  two = jax.jit(functools.partial(two_layers.conv3x3_pool2_twice, relu=relu))
  separate = lambda x, k1, b1, k2, b2: native.conv3x3_pool2(
      native.conv3x3_pool2(x, k1, b1, relu=relu), k2, b2, relu=relu)
  ref = lambda x, k1, b1, k2, b2: _ref(_ref(x, k1, b1, relu), k2, b2, relu)
  y = two(*args)
  if tile == 2:
    np.testing.assert_array_equal(y, jax.jit(separate)(*args))
  else:  # F(5x5, 3x3)'s rounding (winograd.py): within 1e-5 of the outputs' RMS.
    rms = float(np.sqrt(np.mean(np.square(ref(*args)))))
    np.testing.assert_allclose(y, jax.jit(separate)(*args), rtol=0, atol=1e-5 * rms)
  np.testing.assert_allclose(y, ref(*args), rtol=1e-4, atol=1e-4)
  r = jnp.asarray(np.random.default_rng(9).standard_normal(y.shape), jnp.float32)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * r), argnums=(0, 1, 2, 3, 4)))(*args)
           for f in (ref, separate, two)]
  close = 1e-5 if tile == 2 else 1e-4
  for name, want, same_kernels, got in zip("x k1 b1 k2 b2".split(), *grads):
    np.testing.assert_allclose(got, same_kernels, rtol=close, atol=close, err_msg=name)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3, err_msg=name)


@pytest.mark.parametrize("tile", [2, 4, 5])
def test_filter_transforms_match_winograd_py(tile):
  """The kernels' U = G g G^T, its transpose (the backward's operand) and the kernel's gradient
  equal winograd.py's matrix products to float32 rounding (two 1-D passes, not one 2-D one)."""
  c, k = native.lanes(), 3 * native.lanes()
  kernel = jax.random.normal(jax.random.key(0), (3, 3, c, k))
  du = jax.random.normal(jax.random.key(1), ((tile + 2) ** 2, c, k))
  u = winograd.filter_transform(kernel, tile)
  np.testing.assert_allclose(native.filter_transform(kernel, tile), u, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(jax.jit(native.filter_transform, static_argnums=(1, 2))(
      kernel, tile, True), jnp.swapaxes(u, 1, 2), rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(native.filter_transform_grad(du), winograd.filter_transform_grad(du),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="tiles are 2, 4 or 5"):
    native.filter_transform(kernel, 3)


def test_two_layers_give_each_image_the_same_outputs_in_any_batch():
  """F(5x5, 3x3) multiplies a group of images' tiles together (groups of 8 for the CNN): an
  image's outputs must not depend on which images share its group, so predictions and
  evaluations do not depend on the batch they come in."""
  x, k1, b1 = _inputs(0, 19, (28, 28), 1, 32)
  _, k2, b2 = _inputs(1, 1, (4, 4), 32, 64)
  assert two_layers.two_layer_tile(x.shape) == 5
  two = jax.jit(functools.partial(two_layers.conv3x3_pool2_twice, relu=True))
  whole = np.asarray(two(x, k1, b1, k2, b2))
  for lo, hi in ((0, 1), (5, 8), (7, 19), (11, 12)):  # Alone, within a group, across groups.
    np.testing.assert_array_equal(two(x[lo:hi], k1, b1, k2, b2), whole[lo:hi], err_msg=(lo, hi))


def test_two_layers_support_only_what_the_kernels_handle():
  x, k1, _ = _inputs(0, 1, (28, 28), 1, 32)
  _, k2, _ = _inputs(1, 1, (4, 4), 32, 64)
  assert two_layers.supports_two_layers(x, k1, k2)
  assert not two_layers.supports_two_layers(x.astype(jnp.bfloat16), k1, k2)  # float32 only.
  wide = jnp.zeros((1, 28, 28, 8))  # The first layer must be the direct kernel's (Cin < 8).
  assert not two_layers.supports_two_layers(wide, jnp.zeros((3, 3, 8, 32)), k2)
  assert not two_layers.supports_two_layers(jnp.zeros((1, 9, 9, 1)), k1, k2)  # h 3x3: too small.
  assert not two_layers.supports_two_layers(x, k1, jnp.zeros((3, 3, 16, 64)))  # Channels differ.
  with pytest.raises(ValueError, match="does not support"):
    two_layers.conv3x3_pool2_twice(wide, jnp.zeros((3, 3, 8, 32)), jnp.zeros(32), k2,
                                   jnp.zeros(64))
  # The op itself (which makes U from k2 and the tile it is given): either tile where it fits
  # (the CNN's shape: F(2x2, 3x3) or F(5x5, 3x3), equal to the latter's rounding), and a clear
  # refusal of another tile, of F(5x5, 3x3) where the pooled sides are not multiples of 5 (h
  # 14x14: 6x6), and of a second kernel of other channels.
  def call(x, k2, tile):
    return jax.block_until_ready(native.call(
        "fashion_jax_two_layer_fwd", native.pooled_shapes(native.pooled(x, 32), k2), x, k1,
        jnp.zeros(32), k2, jnp.zeros(k2.shape[-1]), relu1=np.int32(1), relu2=np.int32(1),
        tile=np.int32(tile))[0])
  k2 = k2 * 0.3
  f2, f5 = call(x, k2, 2), call(x, k2, 5)
  np.testing.assert_allclose(f5, f2, rtol=0, atol=1e-5 * float(np.sqrt(np.mean(f2 ** 2))))
  x30 = jnp.zeros((1, 30, 30, 1))
  for x_, k2_, tile, says in ((x, k2, 3, "tile 2 or 5"), (x30, k2, 5, r"F\(5x5, 3x3\)"),
                              (x, jnp.zeros((3, 3, 16, 64)), 5, "second kernel")):
    with pytest.raises(Exception, match=says):
      call(x_, k2_, tile)


def test_the_cnn_runs_its_two_layers_as_one_op_and_falls_back_to_two():
  """ops.conv_pool_twice: the one native op where both layers would be native, else the two
  layers in turn (bitwise what conv_pool gives each)."""
  x, k1, b1 = _inputs(0, 2, (28, 28), 1, 32)
  _, k2, b2 = _inputs(1, 1, (4, 4), 32, 64)
  hlo = jax.jit(functools.partial(ops.conv_pool_twice, relu=True)).lower(
      x, k1, b1, k2, b2).as_text()
  assert "fashion_jax_two_layer_fwd" in hlo and "two_layer_train_fwd" not in hlo
  # Under differentiation the training forward, which also returns the first layer's output and
  # taps for the backward, runs once, and the inference forward not at all; the op makes the
  # second layer's Winograd filter U (U^T) and returns its kernel's gradient itself, so no
  # filter-transform op runs beside it.
  loss = lambda k1, k2: jnp.sum(ops.conv_pool_twice(x, k1, b1, k2, b2, relu=True))
  grad_hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(k1, k2).compile().as_text()
  assert grad_hlo.count('custom_call_target="fashion_jax_two_layer_train_fwd"') == 1
  # Its h and taps for the backward: only the 12x12 of h's 13x13 that F(5x5, 3x3)'s tiles read.
  train_fwd = next(line for line in grad_hlo.splitlines()
                   if 'custom_call_target="fashion_jax_two_layer_train_fwd"' in line)
  assert "f32[2,12,12,32]" in train_fwd and "s8[2,12,12,32]" in train_fwd, train_fwd
  assert grad_hlo.count('custom_call_target="fashion_jax_two_layer_bwd"') == 1
  assert 'custom_call_target="fashion_jax_two_layer_fwd"' not in grad_hlo
  assert "fashion_jax_filter_transform" not in grad_hlo + hlo
  for impl in ("xla", "winograd"):
    got = ops.conv_pool_twice(x, k1, b1, k2, b2, impl, relu=True)
    want = ops.conv_pool(ops.conv_pool(x, k1, b1, impl, relu=True), k2, b2, impl, relu=True)
    np.testing.assert_array_equal(got, want)
    assert "two_layer" not in jax.jit(functools.partial(ops.conv_pool_twice, conv_impl=impl)).lower(
        x, k1, b1, k2, b2).as_text()


@pytest.mark.parametrize("cin", [1, 16])  # Direct and Winograd.
@pytest.mark.parametrize("relu", [False, True], ids=["conv_pool", "conv_pool_relu"])
def test_ties_go_to_the_first_maximum_like_reduce_window(cin, relu):
  """Ties in the pool, and (with the ReLU) outputs exactly 0, where the gradient is 0."""
  x = jnp.zeros((2, 8, 8, cin)).at[1, 3:, 2:].set(1.0)  # Flat regions and edges: many exact ties.
  k = jnp.ones((3, 3, cin, 16)).at[..., 4:].set(-1.0)
  b = jnp.arange(16.0) - 4.0  # Channel 4: outputs of exactly 0 on the blank regions.
  r = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 3, 16)), jnp.float32)
  f = lambda fn: jax.grad(lambda k, b: jnp.sum(fn(x, k, b, relu=relu) * r), (0, 1))
  for got, want in zip(jax.jit(f(native.conv3x3_pool2))(k, b), f(_ref)(k, b)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# What the native kernels compute, per kernel: the direct kernel's output and its kernel and
# bias gradients (its input gradient is XLA's transposed convolution); the Winograd path's
# output and its input and kernel gradients (native transforms around XLA matmuls; its bias
# gradient is XLA's reduction). XLA's own convolutions and reductions on CPU do depend on the
# thread count, at rounding level (measured: 4e-6 on the direct input gradient).
_GRADIENTS = """
import os, sys
os.sched_setaffinity(0, {int(cpu) for cpu in sys.argv[2].split(",")})  # Before XLA sizes its pool.
import jax, jax.numpy as jnp, numpy as np
from fashion_jax.kernels import native, plain_conv, two_layers
rng = np.random.default_rng(0)
outputs = {}
for name, (shape, kernel), argnums in (("direct", ((37, 28, 28, 1), (3, 3, 1, 32)), (1, 2)),
                                       ("winograd", ((37, 13, 13, 32), (3, 3, 32, 64)), (0, 1))):
  x = jnp.asarray(rng.uniform(size=shape).astype(np.float32))
  k = jnp.asarray((rng.standard_normal(kernel) * 0.3).astype(np.float32))
  b = jnp.asarray(rng.standard_normal(kernel[-1]).astype(np.float32))
  outputs[f"{name}_y"] = np.asarray(jax.jit(native.conv3x3_pool2)(x, k, b))
  loss = lambda x, k, b: jnp.sum(native.conv3x3_pool2(x, k, b) ** 2)
  for i, g in zip(argnums, jax.jit(jax.grad(loss, argnums=argnums))(x, k, b)):
    outputs[f"{name}_d{'xkb'[i]}"] = np.asarray(g)
x = jnp.asarray(rng.uniform(size=(37, 16, 16, 32)).astype(np.float32))  # The plain conv.
k = jnp.asarray((rng.standard_normal((3, 3, 32, 64)) * 0.3).astype(np.float32))
outputs["plain_y"] = np.asarray(jax.jit(plain_conv.conv3x3)(x, k))
grads = jax.jit(jax.grad(lambda x, k: jnp.sum(plain_conv.conv3x3(x, k) ** 2), argnums=(0, 1)))(x, k)
outputs["plain_dx"], outputs["plain_dk"] = map(np.asarray, grads)
x = jnp.asarray(rng.uniform(size=(37, 30, 30, 32)).astype(np.float32))  # F(4x4, 3x3).
k = jnp.asarray((rng.standard_normal((3, 3, 32, 32)) * 0.3).astype(np.float32))
outputs["plain4_y"] = np.asarray(jax.jit(plain_conv.conv3x3)(x, k))
grads = jax.jit(jax.grad(lambda x, k: jnp.sum(plain_conv.conv3x3(x, k) ** 2), argnums=(0, 1)))(x, k)
outputs["plain4_dx"], outputs["plain4_dk"] = map(np.asarray, grads)
x = jnp.asarray(rng.uniform(size=(37, 30, 30, 1)).astype(np.float32))  # The direct plain conv.
k = jnp.asarray((rng.standard_normal((3, 3, 1, 32)) * 0.3).astype(np.float32))
outputs["direct_plain_y"] = np.asarray(jax.jit(plain_conv.conv3x3)(x, k))
outputs["direct_plain_dk"] = np.asarray(
    jax.jit(jax.grad(lambda k: jnp.sum(plain_conv.conv3x3(x, k) ** 2)))(k))
x = jnp.asarray(rng.uniform(size=(37, 28, 28, 1)).astype(np.float32))  # The two-layer op.
ks = [jnp.asarray((rng.standard_normal(s) * 0.3).astype(np.float32))
      for s in ((3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,))]
two = lambda x, *ks: two_layers.conv3x3_pool2_twice(x, *ks, relu=True)
outputs["two_y"] = np.asarray(jax.jit(two)(x, *ks))
grads = jax.jit(jax.grad(lambda *a: jnp.sum(two(*a) ** 2), argnums=(1, 2, 3, 4)))(x, *ks)
for name, g in zip(("dk1", "db1", "dk2", "db2"), grads):
  outputs[f"two_{name}"] = np.asarray(g)
from fashion_jax.kernels import batchnorm  # BatchNorm + ReLU (padded), several chunks of rows.
y = jnp.asarray(rng.standard_normal((37, 14, 14, 64)).astype(np.float32))
s, b = jnp.asarray(rng.standard_normal((2, 64)).astype(np.float32))
bn = lambda y, s, b: batchnorm.batch_norm_relu(y, s, b, epsilon=1e-5, pad=1)
outputs["bn_z"], outputs["bn_mean"], outputs["bn_var"] = map(np.asarray, jax.jit(bn)(y, s, b))
grads = jax.jit(jax.grad(lambda *a: jnp.sum(bn(*a)[0] ** 2), argnums=(0, 1, 2)))(y, s, b)
outputs["bn_dy"], outputs["bn_ds"], outputs["bn_db"] = map(np.asarray, grads)
bnp = lambda y, s, b: batchnorm.batch_norm_relu_pool(y, s, b, epsilon=1e-5)  # With the pool.
outputs["bnp_z"] = np.asarray(jax.jit(bnp)(y, s, b)[0])
grads = jax.jit(jax.grad(lambda *a: jnp.sum(bnp(*a)[0] ** 2), argnums=(0, 1, 2)))(y, s, b)
outputs["bnp_dy"], outputs["bnp_ds"], outputs["bnp_db"] = map(np.asarray, grads)
from fashion_jax.kernels import dropout  # Dropout's keep mask, several chunks.
outputs["keep_mask"] = np.asarray(jax.jit(lambda k: dropout.bernoulli(k, 0.9, (37, 14, 14, 32)))(
    jax.random.key(5)))
from fashion_jax.kernels import dense  # Both input-gradient formulations, several slabs each.
for b in (37, 300):
  x = jnp.asarray(rng.standard_normal((b, 1600)).astype(np.float32))
  w = jnp.asarray((rng.standard_normal((1600, 128)) * 0.05).astype(np.float32))
  outputs[f"dense{b}_y"] = np.asarray(jax.jit(dense.matmul)(x, w))
  grads = jax.jit(jax.grad(lambda x, w: jnp.sum(dense.matmul(x, w) ** 2), argnums=(0, 1)))(x, w)
  outputs[f"dense{b}_dx"], outputs[f"dense{b}_dw"] = map(np.asarray, grads)
np.savez(sys.argv[1], **outputs)
print("cpus", len(os.sched_getaffinity(0)))
"""


def test_gradients_do_not_depend_on_the_thread_count(tmp_path):
  """Outputs and gradients of the native kernels: bitwise equal with one CPU (XLA's
  intra-op pool, which the kernels split their work over, sized 1) and with all of them."""
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < 2:
    pytest.skip("one CPU: no second thread count to compare with")
  results = {}
  for label, allowed in (("one", {cpus[0]}), ("all", set(cpus)), ("all again", set(cpus))):
    out = tmp_path / f"{label.replace(' ', '_')}.npz"
    # The child sets its own affinity: a preexec_fn runs between fork and exec in this
    # multithreaded (JAX) process, which can deadlock (Python 3.12+ warns of it).
    proc = subprocess.run([sys.executable, "-c", _GRADIENTS, str(out),
                           ",".join(map(str, sorted(allowed)))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["cpus", str(len(allowed))], proc.stdout[-300:]
    results[label] = dict(np.load(out))
  for label in ("all", "all again"):
    assert len(results[label]) == 36 and results[label].keys() == results["one"].keys()
    for key in results["one"]:
      np.testing.assert_array_equal(results[label][key], results["one"][key], err_msg=key)


def _rerun_comparisons(**env):
  """Reruns this file's lax (and flax) comparisons in a subprocess with a build chosen by `env`:
  BatchNorm + ReLU, every shape of the plain conv and of the conv+pool with its ReLU (which
  exercises every code path
  the conv+pool without it has, and the masking; that one runs above, on the best build)."""
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-k",
       "(match_lax or match_flax or match_jax) and not every_ and not [conv_pool-",
       os.path.join(ROOT, "tests", "test_native.py")],
      cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, **env))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  summary = proc.stdout.strip().splitlines()[-1]
  assert "passed" in summary and "skipped" not in summary, summary


@pytest.mark.toolchain
@pytest.mark.parametrize("target", [t.name for t in native_build.targets()])
def test_every_target_this_cpu_runs_matches_lax(target):
  """Each ISA level's build (AVX-512 with 16 lanes, AVX2 with 8, the architecture's portable
  baseline with 4) computes the lax results and gradients: the comparisons above, rerun with
  FASHION_JAX_NATIVE_ISA. The best level is what the tests above ran."""
  known = {t.name: t for t in native_build.targets()}
  if target not in {t.name for t in native_build.runnable()}:
    missing = sorted(known[target].requires - native_build.cpu_flags())
    pytest.skip(f"this CPU cannot run {target} (lacks {', '.join(missing)})")
  if target == native.info()["target"]:
    assert native.info()["lanes"] == known[target].lanes  # The build has the target's width.
    return
  _rerun_comparisons(FASHION_JAX_NATIVE_ISA=target)


@pytest.mark.toolchain
def test_every_vector_width_matches_lax_on_every_cpu():
  """The 16-lane code also where the CPU has no AVX-512 (as two or four instructions per
  operation), so every width is tested on every machine. (A second build: 92 s of a 2-core AVX2
  machine's default suite; run with the other builds, `-m toolchain`, as .ci/run does.)"""
  if any(target.lanes == 16 for target in native_build.runnable()):
    pytest.skip("this CPU runs a 16-lane target: the tests above ran that width")
  _rerun_comparisons(FASHION_JAX_NATIVE_ISA=native_build.runnable()[0].name,
                     FASHION_JAX_NATIVE_LANES="16")


@pytest.mark.toolchain
def test_a_clang_build_matches_lax(tmp_path):
  """The kernels built by Clang (macOS's only C++ compiler, and some Linux systems' `c++`) at
  this CPU's best level compute the lax results and gradients: the comparisons above, rerun in
  a fresh cache with CXX=clang++. (The source once used GCC's __builtin_shuffle, so on a Mac
  the build failed and training fell back to XLA's slower formulations.) .ci/run installs
  Debian's clang."""
  clang = shutil.which("clang++")
  if clang is None:
    pytest.skip("needs clang++ (Debian: clang)")
  _rerun_comparisons(CXX=clang, FASHION_JAX_CACHE_DIR=str(tmp_path))
  (library,) = (tmp_path / "native").glob(f"*/{native_build.LIBRARY}")
  assert b"clang version" in library.read_bytes()  # Clang built it (its .comment section).


def test_the_build_reports_its_target_width_and_isa():
  built = native.info()
  assert built["target"] == native_build.runnable()[0].name  # The best level this CPU runs.
  assert built["lanes"] == native.lanes() == native_build.runnable()[0].lanes
  assert built["isa"] and os.path.isfile(built["library"])
  isa = built["isa"].split(",")
  if built["target"] == "x86-64-v4":
    assert {"avx512f", "avx2", "fma"} <= set(isa)
  elif built["target"] == "x86-64-v3":
    assert {"avx2", "fma"} <= set(isa) and "avx512f" not in isa


def _widest_lanes() -> int:
  """The widest float32 multiply-add vector this CPU has (by its cpuinfo flags)."""
  flags = native_build.cpu_flags()
  if platform.machine() in ("x86_64", "AMD64"):
    return 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
  return 4


def test_the_measured_peak_is_whole_vector_pipes_at_each_width():
  """The benchmark's peak (native.measure_peak): at each width the CPU has, FLOP per cycle per
  core comes out a power of two, at least one multiply-add vector per cycle (a miscounted
  loop, a spilled or unfused one would not). Of eight short runs, the one nearest a power of
  two among those in the range a CPU can have: a busy neighbour skews one phase (FMA or clock)
  of a run, either way (under a loaded suite runs came out at 2,609 and 64 FLOP/cycle at 4
  lanes, and the nearest power of two, 64, was out of range); a miscount skews every run."""
  widest = _widest_lanes()
  assert native.measure_peak(1, 0.02)["lanes"] == widest  # Default: the widest, not the build's.
  for lanes in (4, 8, 16):
    if lanes > widest:
      with pytest.raises(ValueError, match=f"no {lanes}-float"):
        native.measure_peak(1, 0.02, lanes)
      continue
    ratios = []
    for _ in range(8):  # (Five were not always enough on a busy CI machine.)
      run = native.measure_peak(1, 0.1, lanes)
      assert run["lanes"] == lanes and run["threads"] == 1
      ratios.append(run["gflops"] * 1000 / run["mhz"])
    # At most two multiply-add pipes a core on x86 (four on Arm cores such as Apple's): a peak
    # counted twice over passed the lower bound alone (an MFU half what it is).
    most = (4 if platform.machine() in ("x86_64", "AMD64") else 8) * lanes
    possible = [q for q in ratios if 2 * lanes / 1.2 < q < most * 1.2]
    assert possible, (lanes, ratios)
    nearest = min(possible, key=lambda q: abs(math.log2(q) - round(math.log2(q))))
    pipes = 2 ** round(math.log2(nearest))
    assert abs(nearest / pipes - 1) < 0.2 and 2 * lanes <= pipes <= most, (lanes, ratios)


@pytest.mark.toolchain
def test_the_peak_uses_the_widest_vectors_whatever_the_build():
  """A build for a lower ISA level (forced, or the only one cached) still times the CPU's
  widest multiply-adds (chosen at run time): the peak is the machine's, not the build's. (A
  second build, the portable one: 72 s of a loaded default suite; with the other builds.)"""
  if _widest_lanes() == 4:
    pytest.skip("this CPU's widest vectors are the portable build's 4 floats: nothing to tell apart")
  portable = native_build.targets()[-1].name
  proc = subprocess.run(
      [sys.executable, "-c", "from fashion_jax.kernels import native; "
       "print(native.info()['lanes'], native.measure_peak(1, 0.02)['lanes'])"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", FASHION_JAX_NATIVE_ISA=portable))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["4", str(_widest_lanes())]


@pytest.mark.parametrize("flags,machine,want", [
    ("fpu sse sse2 pni ssse3 sse4_1 sse4_2 cx16 popcnt lahf_lm avx avx2 fma bmi1 bmi2 f16c abm "
     "movbe xsave avx512f avx512bw avx512cd avx512dq avx512vl", "x86_64", "x86-64-v4"),
    ("fpu sse sse2 pni ssse3 sse4_1 sse4_2 cx16 popcnt lahf_lm avx avx2 fma bmi1 bmi2 f16c abm "
     "movbe xsave avx512f", "x86_64", "x86-64-v3"),  # AVX-512F alone is not v4.
    ("fpu sse sse2 pni ssse3 sse4_1 sse4_2 cx16 popcnt lahf_lm avx", "x86_64", "x86-64"),
    ("", "x86_64", "x86-64"),  # No /proc/cpuinfo: the portable baseline.
    ("fp asimd evtstrm aes pmull sha1 sha2 crc32", "aarch64", "armv8-a")])
def test_the_best_target_the_cpu_runs_is_chosen(monkeypatch, flags, machine, want):
  monkeypatch.setattr(native_build, "cpu_flags", lambda: frozenset(flags.split()))
  monkeypatch.setattr(native_build.platform, "machine", lambda: machine)
  monkeypatch.delenv("FASHION_JAX_NATIVE_ISA", raising=False)
  monkeypatch.delenv("FASHION_JAX_NATIVE_LANES", raising=False)
  target, width = native_build.choose(jax.ffi.include_dir())
  assert target.name == want and width == target.lanes


def test_a_forced_target_this_cpu_cannot_run_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(native_build, "cpu_flags", lambda: native_build.TARGETS["x86_64"][1].requires)
  monkeypatch.setattr(native_build.platform, "machine", lambda: "x86_64")
  monkeypatch.setenv("FASHION_JAX_NATIVE_ISA", "x86-64-v4")
  with pytest.raises(ValueError, match="this CPU lacks avx512bw, avx512cd, avx512dq, avx512f, avx512vl$"):
    native_build.choose(jax.ffi.include_dir())
  monkeypatch.setenv("FASHION_JAX_NATIVE_ISA", "avx9000")
  with pytest.raises(ValueError, match="use one of"):
    native_build.choose(jax.ffi.include_dir())


def test_a_forced_target_is_trusted_where_the_cpu_features_are_unknown(monkeypatch):
  """macOS has no /proc/cpuinfo: an Intel Mac with AVX2 can still ask for x86-64-v3 (warned);
  a name that is no target is still an error."""
  monkeypatch.setattr(native_build, "cpu_flags", frozenset)
  monkeypatch.setattr(native_build.platform, "machine", lambda: "x86_64")
  monkeypatch.delenv("FASHION_JAX_NATIVE_LANES", raising=False)
  monkeypatch.setenv("FASHION_JAX_NATIVE_ISA", "x86-64-v3")
  warnings = []
  monkeypatch.setattr(native_build.logging, "warning", lambda *args: warnings.append(args))
  target, width = native_build.choose(jax.ffi.include_dir())
  assert (target.name, width) == ("x86-64-v3", 8)
  assert len(warnings) == 1 and "not checked" in warnings[0][0]
  monkeypatch.setenv("FASHION_JAX_NATIVE_ISA", "avx9000")
  with pytest.raises(ValueError, match="use one of"):
    native_build.choose(jax.ffi.include_dir())


def test_supports_only_what_the_kernel_handles():
  x, k = jnp.zeros((2, 28, 28, 1)), jnp.zeros((3, 3, 1, 32))
  assert native.supports(x, k)
  assert not native.supports(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  assert native.supports(jnp.zeros((2, 13, 13, 32)), jnp.zeros((3, 3, 32, 64)))  # Winograd.
  assert not native.supports(jnp.zeros((2, 13, 13, 12)), jnp.zeros((3, 3, 12, 64)))
  assert not native.supports(x, jnp.zeros((3, 3, 1, 12)))  # Cout not a multiple of the width.
  assert not native.supports(jnp.zeros((2, 3, 9, 1)), k)  # Smaller than one pooling window.
  with pytest.raises(ValueError, match="does not support"):
    native.conv3x3_pool2(x, jnp.zeros((3, 3, 1, 12)), jnp.zeros(12))


def test_auto_and_native_choices():
  x, k, b = _inputs(1, 2, (13, 13), 1, 16)
  np.testing.assert_array_equal(ops.conv_pool(x, k, b, "auto"), native.conv3x3_pool2(x, k, b))
  x16, k16, b16 = _inputs(2, 2, (13, 13), 16, 16)
  np.testing.assert_array_equal(ops.conv_pool(x16, k16, b16, "auto"),
                                native.conv3x3_pool2(x16, k16, b16))
  # "native" falls back to auto's choice where the kernels do not apply (XLA Winograd here).
  x10, k10, b10 = _inputs(3, 2, (13, 13), 10, 16)  # 10: no multiple of any width.
  np.testing.assert_array_equal(ops.conv_pool(x10, k10, b10, "native"),
                                ops.conv_pool(x10, k10, b10, "winograd"))
  # BatchNorm + ReLU: native with "native" and with "auto" here (one CPU device, kernels built).
  assert ops.native_chosen("native") and ops.native_chosen("auto")
  assert not any(ops.native_chosen(impl) for impl in ("xla", "im2col", "winograd"))


def test_native_is_cpu_only(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  x, k, b = _inputs(1, 2, (13, 13), 1, 8)
  with pytest.raises(ValueError, match="CPU only"):
    ops.conv_pool(x, k, b, "native")
  with pytest.raises(ValueError, match="CPU only"):
    ops.native_chosen("native")
  assert not ops.native_chosen("auto")  # Flax's BatchNorm on accelerators.


def test_batch_norm_relu_falls_back_to_flax_where_the_kernels_do_not_apply():
  """Evaluation (running averages), bfloat16, channels no width divides, a module not
  configured as the kernels compute: flax's nn.BatchNorm + relu (+ pad), bitwise; no kernel."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from fashion_jax.model import models  # pylint: disable=g-import-not-at-top
  lanes = native.lanes()
  cases = [(jnp.float32, lanes, {}, True), (jnp.bfloat16, lanes, {}, False),
           (jnp.float32, lanes + 1, {}, False), (jnp.float32, lanes, {"use_bias": False}, False),
           (jnp.float32, lanes, {"axis": 1}, False)]
  for dtype, c, kwargs, train_native in cases:
    y = jnp.asarray(np.random.default_rng(c).standard_normal((2, 5, 5, c)), dtype)
    for train in (False, True):
      module = models.BatchNormReLU(use_running_average=not train, pad=1, native=True, **kwargs)
      plain = nn.BatchNorm(use_running_average=not train, **kwargs)
      variables = plain.init(jax.random.key(0), y)
      run = lambda m, f=lambda z: z: jax.jit(lambda v: f(m.apply(v, y, mutable=["batch_stats"])[0]))
      pad = lambda z: jnp.pad(jax.nn.relu(z), ((0, 0), (1, 1), (1, 1), (0, 0)))
      uses_kernel = "fashion_jax_bn" in run(module).lower(variables).as_text()
      assert uses_kernel == (train and train_native), (dtype, c, kwargs, train)
      if not uses_kernel:
        np.testing.assert_array_equal(run(module)(variables), run(plain, pad)(variables))
  # With the pool: odd sizes, or the pool and a border together, are flax's + ops.max_pool_2x2.
  for shape, pad, native_ok in (((2, 6, 6), 0, True), ((2, 5, 6), 0, False),
                                ((2, 6, 6), 1, False)):
    y = jnp.asarray(np.random.default_rng(1).standard_normal((*shape, lanes)), jnp.float32)
    plain = nn.BatchNorm(use_running_average=False)
    variables = plain.init(jax.random.key(0), y)
    module = models.BatchNormReLU(use_running_average=False, pool=True, pad=pad, native=True)
    run = lambda m, f=lambda z: z: jax.jit(lambda v: f(m.apply(v, y, mutable=["batch_stats"])[0]))
    uses_kernel = "fashion_jax_bn_relu_pool" in run(module).lower(variables).as_text()
    assert uses_kernel == native_ok, (shape, pad)
    pool = lambda z, pad=pad: jnp.pad(ops.max_pool_2x2(jax.nn.relu(z)),
                                      ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    if not uses_kernel:
      np.testing.assert_array_equal(run(module)(variables), run(plain, pool)(variables))


_STUB_INFO = ('#define FJ_STR2(x) #x\n#define FJ_STR(x) FJ_STR2(x)\n'
              'extern "C" const char* FjKernelInfo() { return "lanes=" FJ_STR(FJ_LANES) " isa=stub"; }\n'
              'extern "C" int FjMeasurePeak() { return -1; }\n')


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
  """Runs `native._load` afresh against an empty cache; restores the real state after.

  It builds a stub source exporting the kernels' symbols (0.2 s instead of ~8 s a build):
  these tests are about the build, the cache and the fallbacks, and the real kernels are
  registered first (XLA keeps the first handler per name), so no stub is ever called.
  """
  assert native.available(), native._load()  # pylint: disable=protected-access
  stub = tmp_path / "stub.cc"
  stub.write_text("".join(f'extern "C" void {symbol}() {{}}\n'
                          for symbol in native._TARGETS.values()) + _STUB_INFO)  # pylint: disable=protected-access
  monkeypatch.setattr(native_build, "SOURCE", stub)
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "cache"))
  native._load.cache_clear()  # pylint: disable=protected-access
  yield
  monkeypatch.undo()
  native._load.cache_clear()  # pylint: disable=protected-access
  assert native.available()


def test_disabled_by_environment(fresh_load, monkeypatch):
  del fresh_load
  monkeypatch.setenv("FASHION_JAX_NATIVE", "0")
  assert not native.available()
  assert "FASHION_JAX_NATIVE=0" in native._load()  # pylint: disable=protected-access
  x, k, b = _inputs(1, 2, (13, 13), 1, 8)
  np.testing.assert_array_equal(ops.conv_pool(x, k, b, "auto"), ops.conv_pool(x, k, b, "im2col"))
  x16, k16, b16 = _inputs(2, 2, (13, 13), 16, 8)
  np.testing.assert_array_equal(ops.conv_pool(x16, k16, b16, "auto"),
                                ops.conv_pool(x16, k16, b16, "winograd"))
  with pytest.raises(ValueError, match="unavailable"):
    ops.conv_pool(x, k, b, "native")


def _no_compiler(monkeypatch):
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setattr(shutil, "which", lambda name, path=None: None)


def test_without_a_compiler_or_a_prebuilt_library(fresh_load, monkeypatch):
  del fresh_load
  _no_compiler(monkeypatch)
  assert not native.available()
  assert "no C++ compiler" in native._load() and "no prebuilt kernels" in native._load()  # pylint: disable=protected-access


def test_without_a_compiler_the_best_prebuilt_target_this_cpu_runs_is_loaded(fresh_load,
                                                                             monkeypatch):
  """A cache filled ahead of time (`--all`, on another machine) serves a CPU with no compiler.
  Here only the lower levels are in it: the best of those this CPU runs is loaded."""
  del fresh_load
  include = jax.ffi.include_dir()
  best, *lower = native_build.runnable()
  if not lower:
    pytest.skip(f"this CPU runs only {best.name}: no lower level to fall back to")
  for target in lower:
    native_build.build(target, target.lanes, include)
  _no_compiler(monkeypatch)
  assert native.available(), native._load()  # pylint: disable=protected-access
  assert native.info()["target"] == lower[0].name and native.lanes() == lower[0].lanes


def test_compile_error_is_reported_and_nothing_half_built_is_left(fresh_load, monkeypatch,
                                                                   tmp_path):
  del fresh_load
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  monkeypatch.setattr(native_build, "SOURCE", broken)
  assert not native.available()
  assert "failed" in native._load()  # pylint: disable=protected-access
  assert not list(Path(native_build.cache_dir()).rglob("*.so"))


def test_inference_loads_the_kernels_only_if_nothing_is_compiled(fresh_load):
  """native.available_without_building (evaluation's and inference's test): False with an empty
  cache, and it builds nothing; True once this CPU's build is cached, loading it."""
  del fresh_load
  assert not native.available_without_building()
  assert not list(Path(native_build.cache_dir()).rglob("*.so"))
  assert native.available()  # Builds (the stub).
  native._load.cache_clear()  # pylint: disable=protected-access
  assert native.available_without_building() and native.info()["target"]


def test_builds_into_the_cache_once(fresh_load):
  del fresh_load
  assert native.available()
  built_libraries = list(Path(native_build.cache_dir()).rglob("*.so"))
  assert len(built_libraries) == 1
  assert built_libraries[0].parent.name.startswith(f"{native.info()['target']}-{native.lanes()}-")
  inode = built_libraries[0].stat().st_ino
  native._load.cache_clear()  # pylint: disable=protected-access
  assert native.available()
  assert built_libraries[0].stat().st_ino == inode  # Loaded, not rebuilt (a build replaces it).


def test_builds_unused_for_a_month_are_pruned_when_a_new_one_is_made(fresh_load, monkeypatch):
  """Each new source or jax version makes new builds; old ones go once unused for 30 days. A
  load marks its build used; entries that are not this user's alone, and symlinks, stay."""
  del fresh_load
  root = native_build.cache_dir()
  root.mkdir(parents=True)
  os.chmod(root, 0o700)
  month_ago = time.time() - 31 * 86400

  def entry(name, age=month_ago, mode=0o700):
    folder = root / name
    folder.mkdir(mode=mode)
    os.chmod(folder, mode)
    (folder / native_build.LIBRARY).write_bytes(b"old build")
    for path in (folder / native_build.LIBRARY, folder):
      os.utime(path, (age, age))
    return folder

  stale, old_format = entry("x86-64-v3-8-0123456789abcdef"), entry("8615973ded16f320")
  recent = entry("x86-64-4-fedcba9876543210", age=time.time() - 5 * 86400)
  shared = entry("x86-64-v4-16-00000000aaaaaaaa", mode=0o777)  # Not this user's alone.
  (root / "link").symlink_to(stale)
  assert native.available()  # Builds the current key, then prunes.
  current = root / _best_key()
  assert (current / native_build.LIBRARY).exists()
  assert not stale.exists() and not old_format.exists()
  assert recent.exists() and shared.exists() and (root / "link").is_symlink()
  # Loading marks the build used, so one used daily by another environment is never pruned.
  library = current / native_build.LIBRARY
  os.utime(library, (month_ago, month_ago))
  native._load.cache_clear()  # pylint: disable=protected-access
  assert native.available()
  assert library.stat().st_mtime > time.time() - 60
  assert native_build.prune(keep="none") == []  # Nothing is 30 days unused now.
  assert native_build.prune(keep="none", now=time.time() + 31 * 86400) == sorted(
      [current.name, recent.name])


def _best_key():
  best = native_build.runnable()[0]
  return native_build.build_key(best, best.lanes, jax.ffi.include_dir())


def test_a_damaged_cache_entry_is_rebuilt(fresh_load):
  del fresh_load
  damaged = native_build.cache_dir() / _best_key() / "conv_pool.so"
  damaged.parent.mkdir(parents=True)
  damaged.write_bytes(b"\x7fELF truncated")
  assert native.available(), native._load()  # pylint: disable=protected-access
  assert damaged.stat().st_size > 1_000  # Rebuilt: a whole shared library.


def test_an_unwritable_cache_falls_back_to_a_temporary_folder(fresh_load, monkeypatch, tmp_path):
  del fresh_load
  blocker = tmp_path / "not_a_folder"
  blocker.write_text("")
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(blocker / "cache"))
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  assert native.available(), native._load()  # pylint: disable=protected-access
  (built,) = (tmp_path / "tmp").rglob("conv_pool.so")
  assert built.parent.name.startswith("fashion_jax_native_")  # mkdtemp: unpredictable, 0700.
  assert built.parent.stat().st_mode & 0o777 == 0o700


def test_a_planted_library_is_never_loaded(fresh_load, monkeypatch, tmp_path):
  """Issue 15's reproduction: a library placed where an older version looked (the predictable
  <tmp>/fashion_jax-<uid>/native/<key>/) or in a cache folder others can write is not loaded,
  with a compiler or without one (where a trusted prebuilt library would be)."""
  del fresh_load
  marker = tmp_path / "planted_ran"
  planted = tmp_path / "planted.cc"
  planted.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void run() {{ '
                     f'FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\n' + "".join(
                         f'extern "C" void {s}() {{}}\n' for s in native._TARGETS.values())  # pylint: disable=protected-access
                     + _STUB_INFO.replace("FJ_STR(FJ_LANES)", f'"{native.lanes()}"'))
  key = _best_key()
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  for where in (tmp_path / "tmp" / f"fashion_jax-{os.getuid()}" / "native" / key,
                native_build.cache_dir() / key):
    where.mkdir(parents=True)
    subprocess.run([native_build.compiler(), "-shared", "-fPIC", str(planted), "-o",
                    str(where / "conv_pool.so")], check=True)
  os.chmod(native_build.cache_dir(), 0o777)  # The cache's folder is writable by anyone.
  assert native.available(), native._load()  # pylint: disable=protected-access
  assert not marker.exists()  # Neither planted library's constructor ran.
  assert Path(native.info()["library"]).parent.name.startswith("fashion_jax_native_")
  native._load.cache_clear()  # pylint: disable=protected-access
  _no_compiler(monkeypatch)
  assert not native.available() and "no prebuilt kernels" in native._load()  # pylint: disable=protected-access
  assert not marker.exists()


def test_the_build_key_covers_jaxlib_the_ffi_headers_and_the_width(monkeypatch, tmp_path):
  include = tmp_path / "include" / "xla" / "ffi" / "api"
  include.mkdir(parents=True)
  (include / "ffi.h").write_text("// v1\n")
  target = native_build.targets()[0]
  key = lambda lanes=target.lanes: native_build.build_key(target, lanes, str(tmp_path / "include"))
  first = key()
  assert first.startswith(f"{target.name}-{target.lanes}-")
  assert key(4) != first
  (include / "ffi.h").write_text("// v2\n")
  native_build._headers.cache_clear()  # pylint: disable=protected-access
  assert key() != first
  real = native_build.importlib.metadata.version
  monkeypatch.setattr(native_build.importlib.metadata, "version",
                      lambda name: "0.0.0" if name == "jaxlib" else real(name))
  (include / "ffi.h").write_text("// v1\n")
  native_build._headers.cache_clear()  # pylint: disable=protected-access
  assert key() != first


def test_prebuild_command_reports_where_or_why(capsys, fresh_load, monkeypatch):
  del fresh_load
  assert native.main([]) == 0
  assert f"ready for this CPU (target={native_build.runnable()[0].name}" in capsys.readouterr().out
  native._load.cache_clear()  # pylint: disable=protected-access
  assert native.main(["--all"]) == 0  # Every target of the architecture, runnable here or not.
  out = capsys.readouterr().out
  for target in native_build.targets():
    assert f"{target.name} ({target.lanes} lanes): {native_build.cache_dir()}" in out
  assert len(list(native_build.cache_dir().rglob("conv_pool.so"))) == len(native_build.targets())
  native._load.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setenv("FASHION_JAX_NATIVE", "0")
  assert native.main([]) == 1
  assert "unavailable: disabled by FASHION_JAX_NATIVE=0" in capsys.readouterr().out
  assert native.main(["--bogus"]) == 2


@pytest.mark.parametrize("batch,hw,cin,cout,tile", [
    (5, (30, 30), 1, 32, None),   # cnn_bn's first layer (after SAME padding): the direct kernel.
    (11, (9, 8), 3, 24, None),    # Direct: odd output rows, more images than chunks, channel blocks.
    (3, (16, 16), 32, 64, None),  # cnn_bn's second block (after SAME padding): F(2x2, 3x3).
    (2, (28, 30), 16, 32, None),  # Several blocks of tile rows per image, the last one short.
    (2, (7, 9), 8, 16, None),     # Odd sizes: whole tiles computed, then cropped.
    (1, (3, 3), 8, 8, None),      # One output pixel.
    (3, (30, 30), 32, 32, None),  # cnn_bn's 28x28 layer: F(4x4, 3x3), the whole image one block.
    (2, (58, 18), 16, 48, None),  # F(4x4, 3x3): blocks of tile rows, the last one short.
    (2, (16, 16), 16, 32, 4),     # F(4x4, 3x3) asked for where the output is not whole tiles
    (2, (9, 11), 16, 16, 4)])     # (14x14), nor even (7x9): padded, then cropped.
def test_plain_conv_outputs_and_grads_match_lax(batch, hw, cin, cout, tile):
  x, k, _ = _inputs(batch, batch, hw, cin, cout)
  if not (_fits(cin, cout) and (cin < native.DIRECT_MAX_CHANNELS or cin * cout <= 256 * 256)):
    assert not plain_conv.supports(x, k)
    return
  ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN,
                                              precision=lax.Precision.HIGHEST)
  conv = lambda x, k: plain_conv.conv3x3(x, k, tile)
  want = ref(x, k)
  got = jax.jit(conv)(x, k)
  assert got.shape == want.shape
  # F(4x4, 3x3) where the output's sides are multiples of 4 (or asked for), F(2x2, 3x3) elsewhere.
  four = cin >= native.DIRECT_MAX_CHANNELS and (tile == 4 or (hw[0] - 2) % 4 == (hw[1] - 2) % 4 == 0)
  planes = f"tensor<{36 if four else 16}x{cin}x{cout}xf32>"
  assert (planes in jax.jit(conv).lower(x, k).as_text()) == (cin >= native.DIRECT_MAX_CHANNELS)
  # F(4x4, 3x3)'s transforms round more (factors up to 8, sixths): measured up to 2.6e-5 of the
  # outputs' RMS against 2e-6 for F(2x2, 3x3) (fashion_jax/kernels/winograd.py).
  scale = float(jnp.sqrt(jnp.mean(want ** 2)))
  tol = 1e-4 * scale if four else 1e-5
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
  r = jnp.asarray(np.random.default_rng(9).standard_normal(want.shape), jnp.float32)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * r), argnums=(0, 1)))(x, k)
           for f in (ref, conv)]
  for got_g, want_g in zip(grads[1], grads[0]):
    g_scale = float(jnp.sqrt(jnp.mean(want_g ** 2)))
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-4 * g_scale if four else 2e-4)


def test_plain_conv_drop_in_and_fallbacks():
  x, k, _ = _inputs(4, 2, (8, 8), 16, 16)
  got = ops.conv_general_dilated_native(x, k, (1, 1), "SAME", dimension_numbers=DN)
  want = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  x1, k1 = x[..., :1], k[:, :, :1]  # One input channel: the direct kernel, "auto" too.
  for conv in (ops.conv_general_dilated_native, ops.conv_general_dilated_cpu_auto):
    hlo = jax.jit(lambda x, k, conv=conv: conv(x, k, (1, 1), "SAME", dimension_numbers=DN))
    assert "fashion_jax_direct_conv_fwd" in hlo.lower(x1, k1).as_text()
    np.testing.assert_array_equal(
        conv(x1, k1, (1, 1), "SAME", dimension_numbers=DN),
        plain_conv.conv3x3(jnp.pad(x1, ((0, 0), (1, 1), (1, 1), (0, 0))), k1))
  # Few input channels, outputs no width divides: "auto"'s choice (im2col).
  k1o = jnp.concatenate([k1, k1[..., :1]], axis=-1)  # 17 outputs.
  np.testing.assert_array_equal(
      ops.conv_general_dilated_native(x1, k1o, (1, 1), "SAME", dimension_numbers=DN),
      ops.conv_general_dilated_im2col(x1, k1o, (1, 1), "SAME", dimension_numbers=DN))
  # Channels no width divides: XLA's Winograd, from "native" and "auto" alike (this recursed
  # between the two without end once).
  x10, k10 = x[..., :10], k[:, :, :10, :10]
  for conv in (ops.conv_general_dilated_native, ops.conv_general_dilated_cpu_auto):
    np.testing.assert_array_equal(
        conv(x10, k10, (1, 1), "SAME", dimension_numbers=DN),
        ops.conv_general_dilated_winograd(x10, k10, (1, 1), "SAME", dimension_numbers=DN))
  # Channels whose product is past what the fused kernels do well (WRN-28-10's widest layers):
  # XLA's Winograd, for the plain conv and the conv+pool alike.
  kw = jnp.asarray(np.random.default_rng(3).standard_normal((3, 3, 512, 256)) * 0.05, jnp.float32)
  xw = jnp.asarray(np.random.default_rng(4).standard_normal((1, 4, 4, 512)), jnp.float32)
  assert not plain_conv.supports(xw, kw) and not native.supports(xw, kw)
  assert plain_conv.supports(xw[..., :256], kw[:, :, :256])
  np.testing.assert_array_equal(
      ops.conv_general_dilated_native(xw, kw, (1, 1), "SAME", dimension_numbers=DN),
      ops.conv_general_dilated_winograd(xw, kw, (1, 1), "SAME", dimension_numbers=DN))
  assert not plain_conv.supports(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="does not support"):
    plain_conv.conv3x3(x1, k1o)


@pytest.mark.parametrize("train", [False, True])
def test_cnn_bn_gradients_match_the_xla_model(train):
  """cnn_bn on the native kernels (training: its BatchNorm + ReLU layers too) computes what
  the XLA formulation does: loss, gradients and the running averages."""
  from fashion_jax.model import models  # pylint: disable=g-import-not-at-top
  ref = models.create_model("cnn_bn", conv_impl="xla", pool_impl="xla", dropout_rate=0.0)
  fast = models.create_model("cnn_bn", conv_impl="native", dropout_rate=0.0)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 28, 28, 1)), jnp.float32)
  variables = ref.init(jax.random.key(0), x, train=False)

  def loss(model, params):
    logits, updated = model.apply({**variables, "params": params}, x, train=train,
                                  mutable=["batch_stats"])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 3]), updated

  step = lambda model: jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))
  (l_ref, stats_ref), g_ref = step(ref)(variables["params"])
  (l, stats), g = step(fast)(variables["params"])
  if train:
    hlo = step(fast).lower(variables["params"]).as_text()
    assert "fashion_jax_bn_relu_grad" in hlo and "fashion_jax_bn_relu_pool_grad" in hlo
  np.testing.assert_allclose(l, l_ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), g, g_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), stats,
               stats_ref)


def test_cnn_bn_variables_are_nn_batchnorms_and_convs():
  """The padding written by BatchNorm + ReLU and the VALID convs after it leave cnn_bn's
  variables (checkpoints) and outputs those of its plain definition with nn.BatchNorm and
  SAME convs."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from fashion_jax.model import models  # pylint: disable=g-import-not-at-top

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME", use_bias=False)
      norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
      for features in (32, 64):
        x = nn.relu(norm()(conv(features)(x)))
        x = nn.relu(norm()(conv(features)(x)))
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
      x = nn.relu(norm()(nn.Dense(256, use_bias=False)(x.reshape((x.shape[0], -1)))))
      return nn.Dense(10)(x)

  x = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 28, 28, 1)), jnp.float32)
  plain = Plain().init(jax.random.key(0), x)
  for conv_impl in ("xla", "native"):
    model = models.create_model("cnn_bn", conv_impl=conv_impl, pool_impl="xla", dropout_rate=0.0)
    variables = model.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(plain)
    jax.tree.map(np.testing.assert_array_equal, variables, plain)  # The same initial values.
    for train in (False, True):
      got, _ = model.apply(variables, x, train=train, mutable=["batch_stats"])
      want, _ = Plain().apply(plain, x, train=train, mutable=["batch_stats"])
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# BatchNorm (batch statistics) + ReLU: the native kernels against flax's nn.BatchNorm + relu.

def _bn_flax(y, scale, bias, pad, pool=False):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}}
  z, updated = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=1e-5).apply(
      variables, y, mutable=["batch_stats"])  # momentum 0: the running stats are the batch's.
  z = jax.nn.relu(z)
  if pool:  # lax's pool: its gradient goes to the first maximum of a window.
    z = lax.reduce_window(z, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  if pad:
    z = jnp.pad(z, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return z, updated["batch_stats"]["mean"], updated["batch_stats"]["var"]


def _bn_inputs(seed, shape):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  y = (2.0 + 1.5 * rng.standard_normal(shape)).astype(np.float32)
  y[..., 0] = 3.0  # A constant channel: variance 0 (then clipped, the normalized input 0).
  scale = rng.standard_normal(c).astype(np.float32)  # Some negative: the ReLU flips sides.
  return jnp.asarray(y), jnp.asarray(scale), jnp.asarray(0.5 * rng.standard_normal(c), jnp.float32)


@pytest.mark.parametrize("shape,pad", [
    ((5, 28, 28, 32), 1),   # cnn_bn's first block, writing the next conv's padding.
    ((6, 14, 14, 64), 0),   # Its second block, before the pool.
    ((3, 7, 9, 48), 2),     # Odd sizes, three 16-lane vectors, a wider border.
    ((1100, 16), 0),        # [P, C] rows (the dense layer's): three chunks, the last short.
    ((128, 256), 0)])       # cnn_bn's dense BatchNorm.
def test_batch_norm_relu_outputs_and_grads_match_flax(shape, pad):
  y, scale, bias = _bn_inputs(sum(shape), shape)
  if not batchnorm.supports(y):
    assert not native.fits_lanes(shape[-1])
    return
  native_bn = lambda y, s, b: batchnorm.batch_norm_relu(y, s, b, epsilon=1e-5, pad=pad)
  got = jax.jit(native_bn)(y, scale, bias)
  want = jax.jit(_bn_flax, static_argnums=3)(y, scale, bias, pad)
  assert got[0].shape == want[0].shape
  for g, w in zip(got, want):  # z (its border zeros), the batch mean and variance.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)
  r = jnp.asarray(np.random.default_rng(1).standard_normal(want[0].shape), jnp.float32)
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] * r), argnums=(0, 1, 2)))
  grads = [loss(f)(y, scale, bias) for f in (native_bn, lambda *a: _bn_flax(*a, pad))]
  for g, w in zip(*grads):  # dy, dscale, dbias (r on the border reaches nothing).
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))


@pytest.mark.parametrize("shape", [
    (5, 28, 28, 32),   # cnn_bn's first block's second BatchNorm, then its pool.
    (6, 14, 14, 64),   # Its second block's.
    (3, 6, 10, 48)])   # Three 16-lane vectors; a constant channel: every window a tie.
def test_batch_norm_relu_pool_outputs_and_grads_match_flax(shape):
  y, scale, bias = _bn_inputs(sum(shape), shape)
  if not batchnorm.supports_pool(y):
    assert not native.fits_lanes(shape[-1])
    return
  native_bn = lambda y, s, b: batchnorm.batch_norm_relu_pool(y, s, b, epsilon=1e-5)
  flax_bn = lambda y, s, b: _bn_flax(y, s, b, 0, pool=True)
  got, want = jax.jit(native_bn)(y, scale, bias), jax.jit(flax_bn)(y, scale, bias)
  assert got[0].shape == want[0].shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  for g, w in zip(got, want):  # The pooled z, the batch mean and variance.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)
  r = jnp.asarray(np.random.default_rng(1).standard_normal(want[0].shape), jnp.float32)
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)[0] * r), argnums=(0, 1, 2)))
  grads = [loss(f)(y, scale, bias) for f in (native_bn, flax_bn)]
  for g, w in zip(*grads):  # dy (through each window's first maximum), dscale, dbias.
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))


_PMAP_BN = """
import functools, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from fashion_jax.kernels import batchnorm
assert jax.device_count() == 2
rng = np.random.default_rng(0)
y = jnp.asarray(1.0 + rng.standard_normal((2, 3, 6, 6, 32)), jnp.float32)  # Two devices' shares.
params = {"scale": jnp.asarray(rng.standard_normal(32), jnp.float32),
          "bias": jnp.asarray(rng.standard_normal(32), jnp.float32)}
stats = {"mean": jnp.zeros(32), "var": jnp.ones(32)}

def loss(params, y, bn_native, pool):
  if bn_native and pool:
    z = batchnorm.batch_norm_relu_pool(y, params["scale"], params["bias"], epsilon=1e-5,
                                       axis_name="batch")[0]
  elif bn_native:
    z = batchnorm.batch_norm_relu(y, params["scale"], params["bias"], epsilon=1e-5,
                                  axis_name="batch")[0]
  else:
    bn = nn.BatchNorm(use_running_average=False, epsilon=1e-5, axis_name="batch")
    z = jax.nn.relu(bn.apply({"params": params, "batch_stats": stats}, y,
                             mutable=["batch_stats"])[0])
    if pool:
      z = jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  return jnp.sum(jnp.sin(z))

replicated = jax.tree.map(lambda a: jnp.stack([a, a]), params)
for pool in (False, True):
  got, want = [jax.pmap(jax.value_and_grad(functools.partial(loss, bn_native=bn_native, pool=pool),
                                           argnums=(0, 1)), axis_name="batch")(replicated, y)
               for bn_native in (True, False)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
print("ok")
"""


def test_batch_norm_relu_under_pmap_matches_flax():
  """With axis_name over two devices (pmap): the statistics average over both (pmean), the
  gradient's sums add over both (psum); loss and every gradient as flax's synchronised
  BatchNorm. (The models take the native kernels on one device only; the op itself works on
  any number.)"""
  if native.lanes() > 32:
    pytest.skip("32 channels are not a multiple of this build's width")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", _PMAP_BN], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_batch_norm_relu_supports_and_errors():
  lanes = native.lanes()
  assert batchnorm.supports(jnp.zeros((2, 4, 4, lanes)))
  assert batchnorm.supports(jnp.zeros((3, lanes)))
  assert not batchnorm.supports(jnp.zeros((2, 4, 4, lanes + 1)))  # No whole vectors.
  assert not batchnorm.supports(jnp.zeros((2, 4, 4, lanes), jnp.bfloat16))
  assert not batchnorm.supports(jnp.zeros((2, 3, 4, 4, lanes)))
  s = jnp.ones(lanes)
  with pytest.raises(ValueError, match="does not support"):
    batchnorm.batch_norm_relu(jnp.zeros((3, lanes)), s, s, epsilon=1e-5, pad=1)  # No images.
  with pytest.raises(ValueError, match="does not support"):
    batchnorm.batch_norm_relu(jnp.zeros((2, 4, 4, lanes + 1)), s, s, epsilon=1e-5)
  assert batchnorm.supports_pool(jnp.zeros((2, 4, 6, lanes)))
  assert not batchnorm.supports_pool(jnp.zeros((2, 5, 6, lanes)))  # Odd: VALID would drop a row.
  assert not batchnorm.supports_pool(jnp.zeros((3, lanes)))
  with pytest.raises(ValueError, match="does not support"):
    batchnorm.batch_norm_relu_pool(jnp.zeros((2, 4, 5, lanes)), s, s, epsilon=1e-5)


def _runs_native(fn, *args) -> bool:
  return "fashion_jax_keep_mask" in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("shape", [(128, 14, 14, 32), (5, 7, 3), (1,), (2, 3 * 2**14 + 5)])
@pytest.mark.parametrize("p", [0.9, 0.5, 0.0, 1.0])
def test_keep_mask_matches_jax_random_bernoulli(shape, p):
  """dropout.bernoulli is jax.random.bernoulli bit for bit (cnn_bn's shape, tails short of a
  vector, one element, several chunks; p = 0 and 1), for typed, raw and derived keys, and runs
  natively for each."""
  for key in (jax.random.key(0), jax.random.PRNGKey(3), jax.random.fold_in(jax.random.key(7), 5),
              jax.random.split(jax.random.key(11))[1]):
    fn = lambda k: dropout.bernoulli(k, p, shape)  # pylint: disable=cell-var-from-loop
    got = jax.jit(fn)(key)
    assert got.dtype == jnp.bool_ and got.shape == shape
    assert _runs_native(fn, key) == (native.lanes() >= 8)  # 4 lanes: slower than XLA's.
    np.testing.assert_array_equal(got, jax.random.bernoulli(key, p, shape))
  if shape == (128, 14, 14, 32) and p == 0.9:
    assert abs(float(got.mean()) - 0.9) < 0.002  # Sanity: ~800k draws.


def test_keep_mask_falls_back_to_jax_where_the_kernel_does_not_apply():
  """Other key implementations, jax's non-partitionable threefry bits and empty shapes are
  jax.random.bernoulli's own (the native kernel would give other bits there)."""
  key = jax.random.key(1, impl="rbg")
  fn = lambda k: dropout.bernoulli(k, 0.8, (4, 33))
  assert not dropout.supports(key, 0.8) and not _runs_native(fn, key)
  np.testing.assert_array_equal(jax.jit(fn)(key), jax.random.bernoulli(key, 0.8, (4, 33)))
  key = jax.random.key(2)
  assert dropout.supports(key, 0.8) == (native.lanes() >= 8)
  assert not dropout.supports(key[None], 0.8)
  assert dropout.bernoulli(key, 0.5, (3, 0)).shape == (3, 0)
  previous = jax.config.jax_threefry_partitionable
  jax.config.update("jax_threefry_partitionable", False)
  try:
    assert not dropout.supports(key, 0.8) and not _runs_native(fn, key)
    np.testing.assert_array_equal(jax.jit(fn)(key), jax.random.bernoulli(key, 0.8, (4, 33)))
  finally:
    jax.config.update("jax_threefry_partitionable", previous)


def test_dropout_module_matches_flax_dropout():
  """models.Dropout(native=True) is nn.Dropout: outputs and input gradients bitwise, the same
  rng stream (its name), broadcast_dims, rates 0 and 1, deterministic."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from fashion_jax.model import models  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 16)), jnp.float32)

  def apply(cls, rate, deterministic=False, **kw):
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = cls(rate, deterministic=deterministic, **kw)(x)
        return cls(0.5, broadcast_dims=(1, 2), **kw)(x * 2, deterministic=deterministic)
    f = lambda x: Net().apply({}, x, rngs={"dropout": jax.random.key(1)})
    y, vjp = jax.vjp(jax.jit(f), x)
    return (y, vjp(jnp.cos(x))), jax.jit(f).lower(x).as_text()

  for rate, deterministic in ((0.3, False), (0.0, False), (1.0, False), (0.3, True)):
    (got, hlo), (want, _) = (apply(models.Dropout, rate, deterministic, native=True),
                             apply(nn.Dropout, rate, deterministic))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    native_masks = 0 if deterministic or native.lanes() < 8 else 1 + (0 < rate < 1)
    assert hlo.count("fashion_jax_keep_mask") == native_masks
    assert rate == 1.0 or deterministic or 0 < np.mean(got[0] == 0) < 1  # Some dropped.


def test_cnn_bn_draws_its_dropout_masks_natively_and_as_jax_would(monkeypatch):
  """cnn_bn's training step on CPU takes its three keep masks from the kernel, and its loss and
  gradients are bitwise those with jax.random.bernoulli's masks."""
  from fashion_jax.model import models  # pylint: disable=g-import-not-at-top
  if native.lanes() > 32 or native.lanes() < 8:
    pytest.skip(f"a {native.lanes()}-lane build: 32 channels do not fit, or the masks are jax's")
  model = models.create_model("cnn_bn", conv_impl="native", dropout_rate=0.2)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 28, 28, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 3])

  step = lambda: jax.jit(jax.value_and_grad(loss))
  assert step().lower(variables["params"]).as_text().count("fashion_jax_keep_mask") == 3
  got = step()(variables["params"])
  monkeypatch.setattr(dropout, "supports", lambda key, p: False)
  assert "fashion_jax_keep_mask" not in step().lower(variables["params"]).as_text()
  jax.tree.map(np.testing.assert_array_equal, got, step()(variables["params"]))


@pytest.mark.parametrize("b,d,h", [
    (512, 1600, 128),  # The CNN's Dense(1600 -> 128) at the benchmark's batch: w's slabs transposed.
    (32, 1600, 128),   # ... at its training batch: the input gradient as a transposed store.
    (35, 100, 48),     # An input width that is not whole vectors, a batch not whole row blocks.
    (3, 3136, 256),    # cnn_bn's Dense(3136 -> 256) on a few images.
    (70, 112, 32),     # Slabs of w, the last one short.
    (1, 7, 16),        # One row.
    (8, 64, 10)])      # 10 outputs (the classifiers' last layer): no width divides them.
def test_dense_outputs_and_grads_match_lax(b, d, h):
  rng = np.random.default_rng(b + d + h)
  x = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, h)) * d ** -0.5, jnp.float32)
  if not native.fits_lanes(h):
    assert not dense.supports(x, w)
    with pytest.raises(ValueError, match="does not support"):
      dense.matmul(x, w)
    return
  ref = lambda x, w: jnp.dot(x, w, precision=lax.Precision.HIGHEST)
  assert "fashion_jax_dense_fwd" in jax.jit(dense.matmul).lower(x, w).as_text()
  want = ref(x, w)
  np.testing.assert_allclose(jax.jit(dense.matmul)(x, w), want, rtol=1e-5, atol=1e-5)
  r = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * r), argnums=(0, 1)))(x, w)
           for f in (ref, dense.matmul)]
  for got_g, want_g in zip(grads[1], grads[0]):
    g_scale = float(jnp.sqrt(jnp.mean(want_g ** 2)))
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-5 * g_scale)


def test_dense_drop_in_for_flax_and_fallbacks():
  """nn.Dense(dot_general=dense.dot_general) has nn.Dense's parameters, outputs and gradients
  (leading axes flattened for the kernel; 10 features, which no vector width divides, padded
  with zero columns to whole vectors and cut off again); where the kernel does not apply it is
  lax.dot_general."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)
  for features in (32, 10, 1):
    fast, plain = nn.Dense(features, dot_general=dense.dot_general), nn.Dense(features)
    variables = plain.init(jax.random.key(0), x)
    assert jax.tree.structure(fast.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    hlo = jax.jit(fast.apply).lower(variables, x).as_text()
    assert "fashion_jax_dense_fwd" in hlo
    got, want = fast.apply(variables, x), plain.apply(variables, x)
    assert got.shape == want.shape == (2, 3, features)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    r = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    grads = [jax.jit(jax.grad(lambda v, x, m=m: jnp.sum(m.apply(v, x) * r), argnums=(0, 1)))(
        variables, x) for m in (fast, plain)]
    for got_g, want_g in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
      assert got_g.shape == want_g.shape
      np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-5)
  # Batch axes, another contraction, bfloat16: lax.dot_general's own result.
  w = jnp.asarray(rng.standard_normal((40, 32)), jnp.float32)
  standard = (((1,), (0,)), ((), ()))
  for lhs, rhs, dims in ((x[:, 0], w, standard),
                         (x, jnp.stack([w, w]), (((2,), (1,)), ((0,), (0,)))),
                         (x[0].T, w, (((0,), (0,)), ((), ()))),
                         (x[:, 0].astype(jnp.bfloat16), w.astype(jnp.bfloat16), standard)):
    hlo = jax.jit(lambda l, r, dims=dims: dense.dot_general(l, r, dims)).lower(lhs, rhs).as_text()
    native_expected = dims == standard and lhs.dtype == jnp.float32
    assert ("fashion_jax_dense_fwd" in hlo) == native_expected
    if not native_expected:
      np.testing.assert_array_equal(dense.dot_general(lhs, rhs, dims),
                                    lax.dot_general(lhs, rhs, dims))


@pytest.mark.parametrize("name", ["cnn", "cnn_bn"])
def test_models_run_their_hidden_dense_layer_natively(name):
  """The CNN's Dense(1600 -> 128) and cnn_bn's Dense(3136 -> 256) run on the kernels forward
  and backward where the model's native ops run, and so does the 10-way classifier (its
  columns padded to whole vectors); "xla" models use none."""
  from fashion_jax.model import models  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 28, 28, 1)), jnp.float32)
  for impl, count in (("native", 2), ("xla", 0)):
    model = models.create_model(name, conv_impl=impl, dropout_rate=0.0) if name == "cnn_bn" else (
        models.create_model(name, conv_impl=impl))
    variables = model.init(jax.random.key(0), x, train=False)
    # Squared, so the classifier's forward is needed too (a plain sum's gradient is not).
    loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x, train=False) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
    assert hlo.count("fashion_jax_dense_fwd") == count and hlo.count("fashion_jax_dense_bwd") == count
