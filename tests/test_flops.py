"""FLOP accounting (fashion_jax/benchmarking/flops.py): the native kernels' executed FLOPs, device peaks."""

import jax
import jax.numpy as jnp

from fashion_jax.benchmarking import flops
from fashion_jax.kernels import native
from tests.conftest import require_native


def test_executed_flops_counts_the_kernels_xla_cannot_see():
  require_native()
  x, k, b = jnp.zeros((4, 28, 28, 1)), jnp.zeros((3, 3, 1, 32)), jnp.zeros(32)
  step = jax.jit(jax.grad(lambda k: jnp.sum(native.conv3x3_pool2(x, k, b))))
  direct = 2 * 4 * 13 * 13 * 4 * 9 * 32  # Multiply-adds x 2 of 4 conv outputs per pooled one.
  assert flops.executed_flops(step.lower(k).compile().as_text()) == 2 * direct  # Fwd + bwd.
  x8, k8 = jnp.zeros((4, 13, 13, 32)), jnp.zeros((3, 3, 32, 64))
  step = jax.jit(jax.grad(lambda x: jnp.sum(native.conv3x3_pool2(x, k8, jnp.zeros(64)))))
  tiles = 4 * 5 * 5
  # The fused Winograd layer: forward (input and output transforms, 16 products per tile) and
  # backward (V again, the output transform's gradient, dV and dU, the input's gradient).
  product = 2 * 16 * tiles * 32 * 64
  forward = 32 * tiles * (32 + 64) + product
  backward = 32 * tiles * (2 * 32 + 64) + 2 * product
  assert flops.executed_flops(step.lower(x8).compile().as_text()) == forward + backward
  # The plain fused convolution (cnn_bn's layers): the same count, 2x2 outputs per tile.
  x16 = jnp.zeros((4, 16, 16, 32))
  step = jax.jit(jax.grad(lambda x: jnp.sum(native.conv3x3(x, k8) ** 2)))  # y is needed.
  tiles = 4 * 7 * 7
  product = 2 * 16 * tiles * 32 * 64
  forward = 32 * tiles * (32 + 64) + product
  backward = 32 * tiles * (2 * 32 + 64) + 2 * product
  assert flops.executed_flops(step.lower(x16).compile().as_text()) == forward + backward
  assert flops.executed_flops("%c = f32[2] custom-call(), custom_call_target=\"other\"") == 0


class _Device:
  platform, device_kind = "gpu", "NVIDIA H200"


def test_device_peaks_by_kind_and_dtype():
  assert flops.device_peak_gflops(_Device(), "float32") == (67_000.0, "table entry 'H200', float32")
  assert flops.device_peak_gflops(_Device(), "bfloat16")[0] == 989_000.0
  assert flops.device_peak_gflops(_Device(), "float32", given=5.0) == (5.0, "--peak_gflops")
  unknown = type("D", (), {"platform": "gpu", "device_kind": "Mystery 9000"})()
  peak, why = flops.device_peak_gflops(unknown)
  assert peak != peak and "--peak_gflops" in why  # NaN, and what to do.
