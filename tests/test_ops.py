"""The fast CPU formulations in fashion_jax.kernels.ops compute the lax reference math.

Outputs and gradients (w.r.t. parameters and input) of the im2col convolution,
the Winograd conv+pool and the max-pool variants against
`lax.conv_general_dilated` and `lax.reduce_window`, and the whole CNN's loss
gradients fast vs reference.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
import pytest

from fashion_jax.kernels import dropout, native, ops, winograd
from fashion_jax.model import models
from tests.conftest import require_native

DN = ("NHWC", "HWIO", "NHWC")
TOL = dict(rtol=2e-4, atol=2e-5)


def _close(a, b, **kw):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), **{**TOL, **kw})


def _rand(key, shape):
  return jax.random.normal(key, shape, jnp.float32)


@pytest.mark.parametrize("impl", ["im2col", "winograd"])
@pytest.mark.parametrize("padding,hw,cin,cout", [
    ("VALID", (9, 9), 1, 8), ("VALID", (8, 7), 16, 4), ("SAME", (8, 7), 3, 5),
    ("SAME", (6, 6), 1, 4), (((1, 0), (2, 1)), (6, 6), 16, 4)])
def test_conv_outputs_and_grads(impl, padding, hw, cin, cout):
  kx, kk, kr = jax.random.split(jax.random.key(0), 3)
  x = _rand(kx, (2, *hw, cin))
  k = _rand(kk, (3, 3, cin, cout))

  def ref(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=DN)

  conv = {"im2col": ops.conv_general_dilated_im2col,
          "winograd": ops.conv_general_dilated_winograd}[impl]

  def fast(x, k):
    return conv(x, k, (1, 1), padding, dimension_numbers=DN)

  y_ref, y = ref(x, k), fast(x, k)
  assert y.shape == y_ref.shape
  _close(y, y_ref)
  r = _rand(kr, y.shape)
  g_ref = jax.jit(jax.grad(lambda x, k: jnp.sum(ref(x, k) * r), argnums=(0, 1)))(x, k)
  g = jax.jit(jax.grad(lambda x, k: jnp.sum(fast(x, k) * r), argnums=(0, 1)))(x, k)
  for a, b in zip(g, g_ref):
    _close(a, b)


@pytest.mark.parametrize("conv", [ops.conv_general_dilated_im2col,
                                  ops.conv_general_dilated_winograd])
def test_conv_falls_back_to_lax_for_strides(conv):
  x = _rand(jax.random.key(1), (2, 8, 8, 3))
  k = _rand(jax.random.key(2), (3, 3, 3, 4))
  y = conv(x, k, (2, 2), "SAME", dimension_numbers=DN)
  _close(y, lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=DN))
  k1 = _rand(jax.random.key(3), (1, 1, 3, 4))  # Not 3x3: Winograd hands it to im2col.
  y = conv(x, k1, (1, 1), "SAME", dimension_numbers=DN)
  _close(y, lax.conv_general_dilated(x, k1, (1, 1), "SAME", dimension_numbers=DN))


@pytest.mark.parametrize("name", ["im2col", "winograd", "native", "cpu_auto"])
def test_conv_drop_ins_crop_where_a_padding_is_negative(name):
  """A negative padding crops the input, as lax takes it: the drop-ins' `jnp.pad` raised
  ValueError ("index can't contain negative values"). (The reference is lax on the cropped
  input: XLA:CPU's own convolution with a negative padding returns NaNs in some calls.)"""
  conv = getattr(ops, f"conv_general_dilated_{name}")
  x = _rand(jax.random.key(1), (2, 8, 9, 16))
  k = _rand(jax.random.key(2), (3, 3, 16, 16))
  for padding, cropped, kept in [(((-1, 1), (0, 1)), np.s_[:, 1:], ((0, 1), (0, 1))),
                                 (((1, -1), (2, -2)), np.s_[:, :-1, :-2], ((1, 0), (2, 0)))]:
    fast = lambda x, k, padding=padding: conv(x, k, (1, 1), padding, dimension_numbers=DN)
    ref = lambda x, k, cropped=cropped, kept=kept: lax.conv_general_dilated(
        x[cropped], k, (1, 1), kept, dimension_numbers=DN)
    want = ref(x, k)
    _close(fast(x, k), want)
    r = _rand(jax.random.key(3), want.shape)
    grads = [jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * r), argnums=(0, 1)))(x, k)
             for f in (fast, ref)]
    jax.tree.map(_close, grads[0], grads[1])


def _pool_ref(x):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


@pytest.mark.parametrize("impl", ["reshape", "select"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 4), (1, 5, 5, 1)])
def test_pool_outputs_and_grads(impl, shape):
  x = _rand(jax.random.key(3), shape)
  pool = functools.partial(ops.max_pool_2x2, impl=impl)
  y = pool(x)
  _close(y, _pool_ref(x), rtol=0, atol=0)
  r = _rand(jax.random.key(4), y.shape)
  g = jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * r)))(x)
  _close(g, jax.grad(lambda x: jnp.sum(_pool_ref(x) * r))(x), rtol=0, atol=0)


def test_select_pool_ties_match_reduce_window():
  # Blank image regions give windows of equal values; reduce_window's gradient
  # goes to the first maximal tap, and so must the "select" pool's.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 2, (2, 6, 6, 3)).astype(np.float32))
  r = _rand(jax.random.key(5), (2, 3, 3, 3))
  want = jax.grad(lambda x: jnp.sum(_pool_ref(x) * r))(x)
  got = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool_2x2(x, impl="select") * r)))(x)
  _close(got, want, rtol=0, atol=0)


def test_auto_resolves_to_lax_off_cpu(monkeypatch):
  assert ops.resolve_impl("auto", ops.CONV_IMPLS, fast="im2col") == (
      "im2col" if jax.default_backend() == "cpu" else "xla")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert ops.resolve_impl("auto", ops.CONV_IMPLS, fast="im2col") == "xla"
  assert ops.resolve_impl("auto", ops.POOL_IMPLS, fast=ops.FAST_POOL) == "xla"
  assert ops.resolve_impl("reshape", ops.POOL_IMPLS, fast=ops.FAST_POOL) == "reshape"
  with pytest.raises(ValueError):
    ops.resolve_impl("bogus", ops.POOL_IMPLS, fast="reshape")


def _loss_and_grads(model, params, x, y):
  def lf(p, x):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return jax.jit(jax.value_and_grad(lf, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("batch,hw,cin,cout", [
    (4, (13, 13), 32, 16),  # The CNN's second layer (fewer filters): odd size, row/col dropped.
    (3, (28, 28), 1, 8),    # First layer; odd batch (no weight-gradient chunking).
    (2, (8, 11), 3, 5),     # Even/odd, non-square.
    (1, (4, 4), 2, 3)])     # Smallest input: one tile.
def test_winograd_conv_pool_outputs_and_grads(batch, hw, cin, cout):
  kx, kk, kb, kr = jax.random.split(jax.random.key(3), 4)
  x = jax.random.uniform(kx, (batch, *hw, cin))
  x = x.at[0, :3].set(0.0)  # A blank band: all four outputs of those windows tie.
  k = _rand(kk, (3, 3, cin, cout)) * 0.3
  b = _rand(kb, (cout,))

  def ref(x, k, b):
    y = lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN) + b
    return lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

  y_ref, y = ref(x, k, b), jax.jit(winograd.conv3x3_pool2)(x, k, b)
  assert y.shape == y_ref.shape
  _close(y, y_ref, atol=1e-5)
  r = _rand(kr, y.shape)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * r), argnums=(0, 1, 2)))(x, k, b)
           for f in (ref, winograd.conv3x3_pool2)]
  for a, b_ in zip(*grads):
    _close(a, b_, atol=1e-4)


def _auto_rule_cases(size: int):
  """Inputs for the "auto" rule on CPU, shapes following the build's vector width
  (`native.lanes()`: fixed at 8 outputs, the rule's tests passed at 16 lanes comparing a fallback
  with itself and failed at 8), and the choice each should get: the native kernels where the
  output channels are whole vectors (Winograd, or direct for one input channel), else XLA's
  Winograd for float32 with enough input channels, else im2col (one input channel, bfloat16).
  Returns (cases, x, k): x and k are the first case's."""
  lanes = native.lanes()
  x = _rand(jax.random.key(6), (2, size, size, 16))
  k = _rand(jax.random.key(4), (3, 3, 16, lanes))
  k_odd = _rand(jax.random.key(5), (3, 3, 16, lanes + 1))
  x1 = x[..., :1]
  cases = ((x, k, "native"), (x1, k[:, :, :1], "native"), (x, k_odd, "winograd"),
           (x1, k_odd[:, :, :1], "im2col"),
           (x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), "im2col"))
  return cases, x, k


def test_auto_conv_pool_picks_by_dtype_and_channels():
  """Conv + pool: "auto" on CPU follows `_auto_rule_cases`."""
  require_native()  # tests/test_native.py checks the kernels and their fallback.
  cases, x, k = _auto_rule_cases(13)
  b = _rand(jax.random.key(7), (k.shape[-1] + 1,))
  for lhs, kernel, expected in cases:
    bias = b[:kernel.shape[-1]].astype(lhs.dtype)
    got = ops.conv_pool(lhs, kernel, bias, "auto")
    want = ops.conv_pool(lhs, kernel, bias, expected)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                  err_msg=f"{lhs.shape} {lhs.dtype} * {kernel.shape}: {expected}")
  bias = b[:k.shape[-1]]
  assert not np.array_equal(ops.conv_pool(x, k, bias, "native"),  # Tells them apart.
                            ops.conv_pool(x, k, bias, "winograd"))


def test_auto_conv_on_cpu_follows_the_same_rule():
  """Convs without a pool (cnn_bn, ResNets): "auto" on CPU follows `_auto_rule_cases`."""
  require_native()
  cases, x, k = _auto_rule_cases(12)
  convs = {"native": ops.conv_general_dilated_native,
           "winograd": ops.conv_general_dilated_winograd,
           "im2col": ops.conv_general_dilated_im2col}
  for lhs, rhs, expected in cases:
    got = ops.conv_general_dilated_cpu_auto(lhs, rhs, (1, 1), "SAME", dimension_numbers=DN)
    want = convs[expected](lhs, rhs, (1, 1), "SAME", dimension_numbers=DN)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                  err_msg=f"{lhs.shape} {lhs.dtype} * {rhs.shape}: {expected}")
  # The native and XLA formulations round differently here, so the comparisons above tell them
  # apart.
  assert not np.array_equal(
      convs["native"](x, k, (1, 1), "SAME", dimension_numbers=DN),
      convs["winograd"](x, k, (1, 1), "SAME", dimension_numbers=DN))


def test_winograd_rejects_too_small_inputs():
  with pytest.raises(ValueError, match="at least 4x4"):
    winograd.conv3x3_pool2(jnp.zeros((1, 3, 8, 1)), jnp.zeros((3, 3, 1, 2)), jnp.zeros(2))


@pytest.mark.parametrize("conv_impl,pool_impl", [("auto", "auto"), ("im2col", "reshape"),
                                                 ("winograd", "auto"), ("native", "auto")])
def test_cnn_loss_and_grads_match_reference(conv_impl, pool_impl):
  ref = models.create_model("cnn", conv_impl="xla", pool_impl="xla")
  fast = models.create_model("cnn", conv_impl=conv_impl, pool_impl=pool_impl)
  x = jax.random.uniform(jax.random.key(6), (4, 28, 28, 1))
  # Zero some images' borders, like Fashion-MNIST's blank background, so pool
  # windows tie.
  x = x.at[:2, :6].set(0.0).at[:2, :, -6:].set(0.0)
  y = jnp.array([0, 3, 7, 9])
  params = ref.init(jax.random.key(7), x[:1])["params"]
  params_fast = fast.init(jax.random.key(7), x[:1])["params"]
  # One parameter tree: checkpoints interchange.
  assert jax.tree.structure(params) == jax.tree.structure(params_fast)
  jax.tree.map(lambda a, b: _close(a, b, rtol=0, atol=0), params, params_fast)
  (l_ref, (g_ref, gx_ref)) = _loss_and_grads(ref, params, x, y)
  (l, (g, gx)) = _loss_and_grads(fast, params, x, y)
  _close(l, l_ref)
  jax.tree.map(lambda a, b: _close(a, b, atol=1e-5), g, g_ref)
  _close(gx, gx_ref, atol=1e-6)


def test_keep_mask_takes_any_probability_jax_random_bernoulli_takes():
  """dropout.bernoulli is jax.random.bernoulli also where the native kernel cannot run: a traced
  probability (its attribute must be known when tracing: TracerArrayConversionError) or one
  per element (the kernel had failed at run time, "expected scalar but got array")."""
  key, shape = jax.random.key(4), (4, 32)
  traced = lambda k, p: dropout.bernoulli(k, p, shape)
  np.testing.assert_array_equal(jax.jit(traced)(key, jnp.float32(0.7)),
                                jax.random.bernoulli(key, jnp.float32(0.7), shape))
  p = jnp.linspace(0.1, 0.9, 32, dtype=jnp.float32)
  assert not dropout.supports(key, p)
  np.testing.assert_array_equal(dropout.bernoulli(key, p, shape),
                                jax.random.bernoulli(key, p, shape))
  assert dropout.supports(key, 0.7) == (native.available() and native.lanes() >= 8)
