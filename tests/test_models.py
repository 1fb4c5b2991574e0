import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax.model import models


def test_cnn_shapes_and_parameter_count():
  model = models.create_model("cnn")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes == {
      "Conv_0": {"kernel": (3, 3, 1, 32), "bias": (32,)},
      "Conv_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
      "Dense_0": {"kernel": (1600, 128), "bias": (128,)},
      "Dense_1": {"kernel": (128, 10), "bias": (10,)},
  }
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 225_034
  logits = model.apply(variables, jnp.zeros((5, 28, 28, 1)))
  assert logits.shape == (5, 10) and logits.dtype == jnp.float32


def test_implementations_share_parameters_and_agree():
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  reference = models.create_model("cnn", conv_impl="xla", pool_impl="xla")
  fast = models.create_model("cnn", conv_impl="im2col", pool_impl="reshape")
  variables = reference.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(fast.init(jax.random.key(0), x))
  np.testing.assert_allclose(fast.apply(variables, x), reference.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


def test_unknown_model_names_the_choices():
  with pytest.raises(ValueError, match="unknown model 'resnet9000'.*cnn"):
    models.create_model("resnet9000")


def test_cnn_parameters_and_outputs_match_an_nn_conv_cnn():
  """The fused conv+pool layers keep nn.Conv's parameters: old checkpoints load unchanged."""
  class ConvCNN(nn.Module):  # The classic CNN as written with nn.Conv before the fusion.
    @nn.compact
    def __call__(self, x, train=False):
      for features in (32, 64):
        x = nn.relu(nn.max_pool(nn.Conv(features, (3, 3), padding="VALID")(x), (2, 2), (2, 2)))
      x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
      return nn.Dense(10)(x)

  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  old = ConvCNN().init(jax.random.key(3), x[:1])["params"]
  new = models.create_model("cnn", conv_impl="xla", pool_impl="xla").init(
      jax.random.key(3), x[:1])["params"]
  assert jax.tree.structure(old) == jax.tree.structure(new)
  jax.tree.map(np.testing.assert_array_equal, old, new)
  np.testing.assert_allclose(
      models.create_model("cnn", conv_impl="xla", pool_impl="xla").apply({"params": old}, x),
      ConvCNN().apply({"params": old}, x), rtol=1e-6, atol=1e-6)


def test_linear_is_logistic_regression():
  """Flatten -> Dense 10: logits are images x W + b, nothing else (the loop-overhead baseline)."""
  model = models.create_model("linear")
  x = jax.random.uniform(jax.random.key(2), (3, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  kernel, bias = variables["params"]["Dense_0"]["kernel"], variables["params"]["Dense_0"]["bias"]
  assert kernel.shape == (784, 10) and bias.shape == (10,)
  np.testing.assert_allclose(model.apply(variables, x), x.reshape(3, 784) @ kernel + bias,
                             rtol=1e-5, atol=1e-5)
