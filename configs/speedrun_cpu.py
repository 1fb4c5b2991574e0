r"""Speedrun: >= 91% Fashion-MNIST test accuracy as fast as possible on 2 CPU cores.

The default CNN (Winograd conv+pool on CPU) at batch 128, Adam with a one-cycle
learning-rate schedule peaking at 7e-3, 2.5 epochs (1,170 steps).

  python -m fashion_jax.main --config=configs/speedrun_cpu.py --workdir=/tmp/fj_speedrun \
      --config.idx_dir=../shared/data/fashion_mnist

Measured on 2 CPU cores (BENCHMARKS.md, "Recipes"; wall time from process
start to the final eval, compile included): 91.69 / 91.70 / 91.19 % test
accuracy for seeds 0 / 1 / 2 (mean 91.53 %) at 29.8 / 30.3 / 29.3 s, ~6,200
images/s (a repeat: 30.4 / 30.6 / 28.4 s). The peak learning rate was chosen on a 5,000-image validation split
(two seeds), never on the test set.
"""

from fashion_jax import config_lib


def get_config():
  config = config_lib.load_sibling(__file__, "default")
  config.batch_size = 128
  config.learning_rate = 7e-3
  config.lr_schedule = "onecycle"
  config.num_train_steps = 1170  # 2.5 epochs of 468 steps.
  config.eval_every_steps = 585  # Halfway and at the end: time-to-accuracy in metrics.jsonl.
  config.log_every_steps = 117
  config.checkpoint_every_steps = 1170
  # The TensorBoard sample grid costs ~0.9 s at the first eval (compile + figure): 3% of the run.
  config.tensorboard_samples = 0
  return config
