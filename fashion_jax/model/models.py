"""Models, looked up by name.

Every model maps float images [B, 28, 28, 1] in [0, 1] to logits [B, 10] and
takes `train` (for dropout and BatchNorm in the models that have them). The
convolution and pooling formulation is a constructor argument, so the fast CPU
path and the native `lax` path share one parameter tree: a checkpoint trained
with one loads into the other.

`axis_name` (set by the train loop under pmap) makes BatchNorm compute its
batch statistics over all devices (synchronised BatchNorm), so a pmap run
normalises exactly like one device, and like jit over a mesh, does.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import itertools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from fashion_jax.data import augment
from fashion_jax.kernels import batchnorm
from fashion_jax.kernels import dense
from fashion_jax.kernels import dropout
from fashion_jax.kernels import ops


def _conv_fn(conv_impl: str):
  """The convolution for convs not followed by a pool."""
  if conv_impl == "auto" and ops.on_cpu():
    return ops.conv_general_dilated_cpu_auto
  if conv_impl == "native":
    ops.check_native()
    return ops.conv_general_dilated_native
  impl = ops.resolve_impl(conv_impl, ops.CONV_IMPLS, fast="im2col")
  if impl == "winograd":
    return ops.conv_general_dilated_winograd
  if impl == "im2col":
    return ops.conv_general_dilated_im2col
  return lax.conv_general_dilated


class _ConvParams(nn.Module):
  """A 3x3 conv's parameters, exactly `nn.Conv`'s (kernel HWIO, bias; same initializers): given
  nn.Conv's name, the conv + pool layers that use them are checkpoint-compatible with Conv + pool."""
  features: int

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    return kernel, bias


class BatchNormReLU(nn.BatchNorm):
  """relu(nn.BatchNorm(...)(x)), then with `pool` a 2x2 max-pool (`ops.max_pool_2x2` with
  `pool_impl`), or `pad` zero rows and columns around each image (the SAME padding of a
  convolution that follows, which then runs VALID). Its variables are nn.BatchNorm's, so give
  it BatchNorm's name for checkpoints to match.

  With `native` (the model's choice, `ops.native_chosen`), training on float32 inputs the
  native kernels take (`batchnorm.supports`, `supports_pool`) runs as
  `batchnorm.batch_norm_relu` or `batch_norm_relu_pool`: the same math in four passes instead
  of XLA's eight or so (ten with the pool). Everything else is flax's BatchNorm.
  """
  pad: int = 0
  pool: bool = False
  pool_impl: str = "auto"
  native: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    at_call = use_running_average
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    if use_running_average or self.is_initializing() or not self._native_applies(x):
      z = nn.relu(super().__call__(x, use_running_average=at_call))
      if self.pool:
        z = ops.max_pool_2x2(z, impl=self.pool_impl)
      pads = ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0))
      return jnp.pad(z, pads) if self.pad else z
    features = (x.shape[-1],)  # Declared as nn.BatchNorm declares them (they exist by now).
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    if self.pool:
      z, mean, var = batchnorm.batch_norm_relu_pool(x, scale, bias, epsilon=self.epsilon,
                                                    axis_name=self.axis_name)
    else:
      z, mean, var = batchnorm.batch_norm_relu(x, scale, bias, epsilon=self.epsilon,
                                               axis_name=self.axis_name, pad=self.pad)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return z

  def _native_applies(self, x) -> bool:
    return (self.native and batchnorm.supports(x) and self.axis == -1 and self.use_bias
            and self.use_scale and self.axis_index_groups is None and self.use_fast_variance
            and self.force_float32_reductions and self.param_dtype == jnp.float32
            and self.dtype in (None, jnp.float32) and (x.ndim == 4 or not self.pad)
            and (not self.pool or (batchnorm.supports_pool(x) and not self.pad)))


class Linear(nn.Module):
  """Logistic regression: Flatten -> Dense 10. The baseline (~84 % on Fashion-MNIST).

  Its step is almost no device work, which makes the train loop's own host
  overhead measurable (`python -m fashion_jax.benchmark --loop`).
  """
  num_classes: int = 10
  conv_impl: str = "auto"  # Unused (no convolutions); accepted like every model's.
  pool_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype).reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class CNN(nn.Module):
  """The classic Fashion-MNIST CNN.

  Conv(32, 3x3, VALID)+ReLU -> MaxPool 2 -> Conv(64, 3x3, VALID)+ReLU ->
  MaxPool 2 -> Flatten -> Dense 128+ReLU -> Dense 10.

  ReLU and max-pooling commute (ReLU is monotone), so the pool runs first and
  the ReLU touches a quarter of the values; the result is identical. Each
  conv+pool+ReLU is one op (`ops.conv_pool`), so it can be fused (Winograd, the native
  kernels), and with the native kernels the two layers are one (`ops.conv_pool_twice`).
  """
  num_classes: int = 10
  conv_impl: str = "auto"
  pool_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  axis_name: str | None = None  # Unused (no BatchNorm); accepted like every model's.

  @nn.compact
  def __call__(self, x, train: bool = False):
    k1, b1 = _ConvParams(32, name="Conv_0")(x.shape[-1])
    k2, b2 = _ConvParams(64, name="Conv_1")(k1.shape[-1])
    x, k1, b1, k2, b2 = nn.dtypes.promote_dtype(x, k1, b1, k2, b2, dtype=self.dtype)
    # Both conv + pool + ReLU layers as one op where the native kernels run them.
    x = ops.conv_pool_twice(x, k1, b1, k2, b2, self.conv_impl, self.pool_impl, relu=True)
    x = x.reshape((x.shape[0], -1))
    # nn.Dense's matmul on the native kernels where the model's native ops run (1600 -> 128, and
    # 128 -> 10 with its columns padded to whole vectors), else flax's default.
    dot = dense.dot_general if ops.native_chosen(self.conv_impl) else None
    x = nn.relu(nn.Dense(128, dtype=self.dtype, dot_general=dot)(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, dot_general=dot)(x)
    return x.astype(jnp.float32)


class Dropout(nn.Dropout):
  """flax's `nn.Dropout` (same name, so the same rng stream); with `native` (the model's
  `ops.native_chosen`) its keep mask comes from `dropout.bernoulli`, bitwise
  `jax.random.bernoulli`'s, which XLA:CPU computes ~5x slower. With `axis_name` (training
  under pmap) the mask is drawn for the global batch and this device takes its rows, so each
  example is dropped as under mesh or on one device."""
  native: bool = False
  axis_name: str | None = None

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None, rng=None):
    at_call = deterministic
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    rows = self.axis_name if 0 not in self.broadcast_dims else None
    if (not self.native and rows is None) or deterministic or self.rate in (0.0, 1.0):
      return super().__call__(inputs, deterministic=at_call, rng=rng)
    keep_prob = 1.0 - self.rate
    rng = self.make_rng(self.rng_collection) if rng is None else rng
    shape = [1 if d in self.broadcast_dims else n for d, n in enumerate(inputs.shape)]
    bernoulli = dropout.bernoulli if self.native else jax.random.bernoulli
    mask = augment.draw_rows(lambda k, s: bernoulli(k, keep_prob, s), rng, shape, rows)
    mask = jnp.broadcast_to(mask, inputs.shape)
    return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class CNNBN(nn.Module):
  """A wider CNN with BatchNorm and dropout (published ~93.4% on Fashion-MNIST).

  [Conv(w)-BN-ReLU x2 -> MaxPool 2 -> Dropout] then the same with 2w, on SAME
  padding (28 -> 14 -> 7), then Dense 256-BN-ReLU-Dropout -> Dense 10.
  """
  num_classes: int = 10
  conv_impl: str = "auto"
  pool_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  width: int = 32
  dropout_rate: float = 0.25
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False, dtype=self.dtype,
                             conv_general_dilated=_conv_fn(self.conv_impl))
    native = ops.native_chosen(self.conv_impl)
    names = (f"BatchNorm_{i}" for i in itertools.count())  # nn.BatchNorm's, for checkpoints.
    norm_relu = lambda pad=0, pool=False: BatchNormReLU(  # pylint: disable=g-long-lambda
        use_running_average=not train, momentum=0.9, dtype=self.dtype, pad=pad, pool=pool,
        pool_impl=self.pool_impl, native=native, axis_name=self.axis_name if train else None,
        name=next(names))
    x = x.astype(self.dtype)
    # The native BatchNorm + ReLU before the second conv of a block writes that conv's SAME
    # padding with its output, and the conv runs VALID; the one after it pools in the same
    # passes. Elsewhere the program is nn.BatchNorm's, relu and ops.max_pool_2x2.
    pad = 1 if native else 0
    for features in (self.width, 2 * self.width):
      x = norm_relu(pad=pad)(conv(features, padding="SAME")(x))
      x = norm_relu(pool=True)(conv(features, padding="VALID" if native else "SAME")(x))
      x = Dropout(self.dropout_rate, deterministic=not train, native=native,
                  axis_name=self.axis_name)(x)
    x = x.reshape((x.shape[0], -1))
    dot = dense.dot_general if native else None
    x = norm_relu()(nn.Dense(256, use_bias=False, dtype=self.dtype, dot_general=dot)(x))
    x = Dropout(2 * self.dropout_rate, deterministic=not train, native=native,
                axis_name=self.axis_name)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, dot_general=dot)(x).astype(jnp.float32)


class _PreActBlock(nn.Module):
  features: int
  strides: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  dropout_rate: float
  train: bool
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(x))
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = self.conv(self.features, kernel_size=(1, 1), strides=self.strides)(y)
    y = self.conv(self.features, kernel_size=(3, 3), strides=self.strides)(y)
    y = nn.relu(self.norm()(y))
    y = Dropout(self.dropout_rate, deterministic=not self.train, axis_name=self.axis_name)(y)
    y = self.conv(self.features, kernel_size=(3, 3))(y)
    return y + shortcut


class WideResNet(nn.Module):
  """Pre-activation Wide-ResNet WRN-depth-width (Zagoruyko & Komodakis), for 28x28 inputs.

  (depth - 4) / 6 blocks per stage, stage widths 16, 32, 64 times `width`,
  strides 1, 2, 2 (28 -> 28 -> 14 -> 7), global average pooling.
  """
  num_classes: int = 10
  conv_impl: str = "auto"
  pool_impl: str = "auto"  # Unused (no max-pooling); accepted like every model's.
  dtype: jnp.dtype = jnp.float32
  depth: int = 28
  width: int = 10
  dropout_rate: float = 0.0
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"Wide-ResNet depth must be 6n+4 (10, 16, 22, 28, 40...), got {self.depth}")
    blocks = (self.depth - 4) // 6
    conv = functools.partial(nn.Conv, padding="SAME", use_bias=False, dtype=self.dtype,
                             conv_general_dilated=_conv_fn(self.conv_impl))
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             dtype=self.dtype, axis_name=self.axis_name if train else None)
    x = conv(16, kernel_size=(3, 3))(x.astype(self.dtype))
    for stage, features in enumerate((16 * self.width, 32 * self.width, 64 * self.width)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _PreActBlock(features, strides, conv, norm, self.dropout_rate, train,
                         self.axis_name)(x)
    x = nn.relu(norm()(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn": CNN,
    "cnn_bn": CNNBN,
    "linear": Linear,
    # A small pre-activation ResNet: one block per stage, widths 64/128/256.
    "resnet": functools.partial(WideResNet, depth=10, width=4),
    "wrn": WideResNet,  # Depth and width from config.model_kwargs (default WRN-28-10).
}


def model_names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def setting_problems(model: nn.Module) -> list[str]:
  """What a model's settings (config.model_kwargs) ask that it cannot train with; its constructor
  checks only their names (a WRN depth of 15 failed after the data loaded, a dropout rate of 1.5
  trained at chance level)."""
  problems = []
  if getattr(model, "num_classes", 10) != 10:
    problems.append(f"num_classes={model.num_classes}: Fashion-MNIST has 10 classes")
  width = getattr(model, "width", None)
  if width is not None and not (isinstance(width, int) and width >= 1):
    problems.append(f"width={width!r}: a whole number >= 1")
  depth = getattr(model, "depth", None)
  if depth is not None and not (isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0):
    problems.append(f"depth={depth!r}: 6n+4, e.g. 10, 16, 22, 28, 40")
  rate = getattr(model, "dropout_rate", None)
  top = 0.5 if isinstance(model, CNNBN) else 1.0  # CNNBN's dense dropout is twice the rate.
  if rate is not None and not (isinstance(rate, (int, float)) and 0 <= rate < top):
    problems.append(f"dropout_rate={rate!r}: in [0, {top:g})"
                    + (" (the dense layer's dropout is twice it)" if top < 1 else ""))
  return problems


def create_model(name: str, **kwargs) -> nn.Module:
  try:
    factory = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}") from None
  return factory(**kwargs)
