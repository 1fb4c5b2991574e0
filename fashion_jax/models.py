"""Models, looked up by name.

Every model maps float images [B, 28, 28, 1] in [0, 1] to logits [B, 10] and
takes `train` (for dropout and BatchNorm in the models that have them). The
convolution and pooling formulation is a constructor argument, so the fast CPU
path and the native `lax` path share one parameter tree: a checkpoint trained
with one loads into the other.
"""

from __future__ import annotations

from collections.abc import Callable
import functools

import flax.linen as nn
from jax import lax
import jax.numpy as jnp

from fashion_jax import ops


def _conv_fn(conv_impl: str):
  impl = ops.resolve_impl(conv_impl, ops.CONV_IMPLS, fast="im2col")
  return ops.conv_general_dilated_im2col if impl == "im2col" else lax.conv_general_dilated


class CNN(nn.Module):
  """The classic Fashion-MNIST CNN.

  Conv(32, 3x3, VALID)+ReLU -> MaxPool 2 -> Conv(64, 3x3, VALID)+ReLU ->
  MaxPool 2 -> Flatten -> Dense 128+ReLU -> Dense 10.

  ReLU and max-pooling commute (ReLU is monotone), so the pool runs first and
  the ReLU touches a quarter of the values; the result is identical.
  """
  num_classes: int = 10
  conv_impl: str = "auto"
  pool_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="VALID", dtype=self.dtype,
                             conv_general_dilated=_conv_fn(self.conv_impl))
    pool = functools.partial(ops.max_pool_2x2, impl=self.pool_impl)
    x = x.astype(self.dtype)
    x = nn.relu(pool(conv(32)(x)))
    x = nn.relu(pool(conv(64)(x)))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128, dtype=self.dtype)(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn": CNN,
}


def model_names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def create_model(name: str, **kwargs) -> nn.Module:
  try:
    factory = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}") from None
  return factory(**kwargs)
