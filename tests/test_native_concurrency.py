"""The native kernels called concurrently: XLA's CPU runtime runs an FFI handler on several threads
at once (Python threads running jitted functions, async dispatch, pmap over several CPU
devices). The kernels keep per-thread scratch (thread_local) and split work over XLA's intra-op
pool; every call must give bitwise the results of the same call made alone."""

import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from fashion_jax.kernels import native
from tests.conftest import ROOT, require_native

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module", autouse=True)
def built():
  require_native()


# Shared with the pmap subprocess below: every kind of native handler, with gradients, on
# batches of odd sizes (uneven chunks), as jitted functions of numpy inputs.
_CASES = r"""
import numpy as np, jax, jax.numpy as jnp
from fashion_jax.kernels import batchnorm, dense, native, plain_conv, two_layers

def cases():
  rng = np.random.default_rng(0)
  arr = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)
  x1 = rng.uniform(size=(19, 28, 28, 1)).astype(np.float32)
  k1, b1 = arr(3, 3, 1, 32, scale=0.3), arr(32)
  x2, k2, b2 = arr(7, 13, 13, 32), arr(3, 3, 32, 64, scale=0.1), arr(64)
  loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
  grad = lambda f, n: jax.value_and_grad(loss(f), argnums=tuple(range(n)))
  pool = lambda x, k, b: native.conv3x3_pool2(x, k, b, relu=True)
  two = lambda *a: two_layers.conv3x3_pool2_twice(*a, relu=True)
  bn = lambda y, s, b: batchnorm.batch_norm_relu_pool(y, s, b, epsilon=1e-5)[0]
  return {
      "direct": (grad(pool, 3), (x1, k1, b1)),
      "winograd": (grad(pool, 3), (x2, k2, b2)),
      "two_layers": (grad(two, 5), (x1, k1, b1, k2, b2)),
      "two_layers_f2": (grad(two, 5), (x1[:, :18, :14], k1, b1, k2, b2)),
      "two_layers_inference": (two, (x1, k1, b1, k2, b2)),
      "plain_f4": (grad(plain_conv.conv3x3, 2), (arr(5, 14, 14, 32), k2)),
      "plain_direct": (grad(plain_conv.conv3x3, 2), (x1[:, :10, :10], k1)),
      "dense": (grad(dense.matmul, 2), (arr(37, 200), arr(200, 128, scale=0.1))),
      "dense_small": (grad(dense.matmul, 2), (arr(3, 200), arr(200, 128, scale=0.1))),
      "bn_pool": (grad(bn, 3), (arr(9, 12, 12, 32), arr(32), arr(32))),
  }
"""
_SCOPE: dict = {}
exec(_CASES, _SCOPE)  # pylint: disable=exec-used
cases = _SCOPE["cases"]


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _same(got, want, what):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(g, w, err_msg=what)


def test_the_cases_compute_what_lax_does():
  """The reference results below are right: the kernels' on one thread against lax's."""
  if native.lanes() > 32:
    pytest.skip("32 channels are not a multiple of this build's width")
  c = cases()
  x, k, b = c["winograd"][1]
  conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN)
  ref = lambda x, k, b: jnp.sum(lax.reduce_window(jax.nn.relu(conv(x, k) + b), -jnp.inf, lax.max,
                                                  (1, 2, 2, 1), (1, 2, 2, 1), "VALID") ** 2)
  want = jax.value_and_grad(ref, argnums=(0, 1, 2))(x, k, b)
  got = jax.jit(c["winograd"][0])(x, k, b)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)
  x, w = c["dense"][1]
  np.testing.assert_allclose(jax.jit(c["dense"][0])(x, w)[0], jnp.sum((x @ w) ** 2), rtol=1e-5)


def test_many_threads_calling_the_kernels_at_once_get_each_call_alone_s_results():
  """8 Python threads, each running every case in turn (staggered, so different handlers and
  the same handler overlap), 12 rounds: bitwise the results of each case run alone; then the
  same calls dispatched asynchronously, all in flight before any is read."""
  if native.lanes() > 32:
    pytest.skip("32 channels are not a multiple of this build's width")
  c = cases()
  jitted = {name: jax.jit(f) for name, (f, _) in c.items()}
  want = {name: _np(jitted[name](*args)) for name, (_, args) in c.items()}
  names, errors = list(c), []

  def worker(t):
    try:
      for i in range(12):
        name = names[(t + i) % len(names)]
        _same(_np(jitted[name](*c[name][1])), want[name], f"thread {t} call {i}: {name}")
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors, errors[:3]
  in_flight = [(name, jitted[name](*args)) for _ in range(3) for name, (_, args) in c.items()]
  for name, out in in_flight:
    _same(_np(out), want[name], f"async: {name}")


_PMAP = _CASES + r"""
import sys
assert jax.device_count() == 8, jax.devices()
c = cases()
for name, (f, args) in c.items():
  alone = jax.tree.map(np.asarray, jax.jit(f)(*args))
  mapped = jax.pmap(f)
  stacked = [np.stack([a] * 8) for a in args]
  for _ in range(3):
    out = jax.tree.map(np.asarray, mapped(*stacked))
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(alone), strict=True):
      for d in range(8):
        if want.ndim:  # The kernels' outputs and gradients: bitwise.
          np.testing.assert_array_equal(got[d], want, err_msg=f"{name} on device {d}")
        else:  # The loss: XLA's own sum, which it may order otherwise under pmap (jax 0.7.2).
          np.testing.assert_allclose(got[d], want, rtol=1e-6, err_msg=f"{name} on device {d}")
print("ok")
"""


def test_pmap_over_eight_cpu_devices_gives_each_device_the_results_of_one():
  """Every case under pmap on 8 CPU devices (8 concurrent calls of each handler, on XLA's
  threads): each device's results bitwise those of the call made alone, three times (the loss,
  XLA's own sum, to its rounding: jax 0.7.2 ordered it otherwise under pmap, 1 ulp)."""
  if native.lanes() > 32:
    pytest.skip("32 channels are not a multiple of this build's width")
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  proc = subprocess.run([sys.executable, "-c", _PMAP], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags))
  assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["ok"], proc.stderr[-3000:]
