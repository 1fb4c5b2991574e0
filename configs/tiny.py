r"""A seconds-long configuration for tests and smoke runs.

  python -m fashion_jax.main --config=configs/tiny.py --workdir=/tmp/fj_tiny \
      --config.idx_dir=../shared/data/fashion_mnist

Trains the default CNN for 20 steps of batch 16 and evaluates; the accuracy
means nothing, the point is that every part of the pipeline runs.
"""

from fashion_jax import default_config


def get_config():
  config = default_config.get_config()  # configs/default.py is this.
  config.batch_size = 16
  config.num_epochs = 1
  config.num_train_steps = 20
  config.eval_batch_size = 64
  config.eval_every_steps = 10
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  config.keep_checkpoints = 2
  config.tensorboard_samples = 0  # The sample-prediction figure costs ~2 s per run.
  return config
