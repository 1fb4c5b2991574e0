"""Dropout's keep mask on the native CPU kernels, bitwise `jax.random.bernoulli`'s.

flax's `nn.Dropout` draws its mask with `jax.random.bernoulli(key, keep_prob, shape)`, and
XLA:CPU runs threefry2x32's 20 rounds as a rolled loop over the whole arrays (two uint32 arrays
read and written per round): 2.2 ms of cnn_bn's ~40 ms step at batch 128 for its three masks.
`bernoulli` computes the same bits in registers (`csrc/conv_pool.cc`, section 4) where
`supports` holds, and calls `jax.random.bernoulli` everywhere else, so a run's masks, and
with them its training trajectory, do not depend on which path drew them.

Measured on the Zen 5 (three masks of cnn_bn at batch 128, BENCHMARKS.md): XLA 1.9-2.9 ms;
the 16-lane build 0.37-0.47 ms, the 8-lane (AVX2) one 1.2 ms, the 4-lane portable one 2.2 ms
(SSE2 has no vector rotate), slower than XLA's AVX-512 loop: so 4-lane builds leave the masks
to jax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.kernels import native


def _typed(key) -> bool:
  return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def supports(key: jax.Array, p) -> bool:
  """Whether `bernoulli(key, p, shape)` runs natively: one threefry2x32 key (typed or raw
  uint32[2]), a float32 probability known when tracing, one for all draws (a Python float
  without jax_enable_x64: the kernel takes it as an attribute), jax's default partitionable
  threefry bits, and the kernels built 8 or 16 lanes wide. (Not whether the caller is on CPU.)"""
  if (isinstance(p, jax.core.Tracer) or np.ndim(p) != 0 or jnp.result_type(p) != jnp.float32
      or not getattr(jax.config, "jax_threefry_partitionable", True)):  # (Goes once default.)
    return False
  if _typed(key):
    impl_ok = key.shape == () and str(jax.random.key_impl(key)) == "threefry2x32"
  else:  # A raw key: jax takes it for one of the default implementation.
    impl_ok = (key.shape == (2,) and key.dtype == jnp.uint32
               and jax.config.jax_default_prng_impl == "threefry2x32")
  if not impl_ok:
    return False
  return native.available() and native.lanes() >= 8


def bernoulli(key: jax.Array, p: float, shape) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)`, bitwise: natively where `supports(key, p)` holds
  (call it on CPU only: the kernels are CPU code), else by jax."""
  shape = tuple(int(d) for d in shape)
  if not supports(key, p) or not shape or 0 in shape:
    return jax.random.bernoulli(key, p, shape)
  data = jax.random.key_data(key) if _typed(key) else key
  return native.call("fashion_jax_keep_mask", jax.ShapeDtypeStruct(shape, jnp.bool_), data,
                     p=np.float32(p))
