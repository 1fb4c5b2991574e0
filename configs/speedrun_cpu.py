r"""Speedrun: >= 91% Fashion-MNIST test accuracy as fast as possible on 2 CPU cores.

The default CNN at the batch size where the fast CPU step peaks, with a
one-cycle learning-rate schedule so that a short run converges.

  python -m fashion_jax.main --config=configs/speedrun_cpu.py --workdir=/tmp/fj_speedrun \
      --config.idx_dir=../shared/data/fashion_mnist

Measured on 2 CPU cores (BENCHMARKS.md, "Recipes"; wall time from process
start, compile included): final test accuracy 91.13 / 91.53 / 90.98 % for
seeds 0 / 1 / 2 (mean 91.21 %) at 52 s; >= 91 % first reached at 43.6 s and
51.8 s (seeds 0, 1). The issue's target of <= 30 s is not reached yet.
"""

from fashion_jax import config_lib


def get_config():
  config = config_lib.load_sibling(__file__, "default")
  config.batch_size = 128
  config.learning_rate = 3e-3
  config.lr_schedule = "onecycle"
  config.num_epochs = 3
  config.eval_every_steps = 234  # Every half epoch: time-to-accuracy reads off metrics.jsonl.
  config.log_every_steps = 117
  config.checkpoint_every_steps = 1404
  return config
