r"""Speedrun: >= 91% Fashion-MNIST test accuracy as fast as possible on 2 CPU cores.

The default CNN (native conv+pool kernels on CPU) at batch 128, Adam with a
one-cycle learning-rate schedule peaking at 7e-3, 2.5 epochs (1,170 steps).

  python -m fashion_jax.main --config=configs/speedrun_cpu.py --workdir=/tmp/fj_speedrun \
      --config.idx_dir=../shared/data/fashion_mnist

Measured on 2 CPU cores (BENCHMARKS.md, "Recipes"; wall time from process
start to the final eval, compile included): 91.55 / 91.67 / 91.24 % test
accuracy for seeds 0 / 1 / 2 (mean 91.49 %) at 7.4 / 8.2 / 8.5 s (AMD EPYC Zen 5
VM, AVX-512 kernels, the two conv layers as one op; with the kernels before it
91.59 % mean at 8.9-10.0 s, ~30,000 images/s in the loop). On the AVX2 VM with
the earlier kernels: 91.56 % mean at 18.5-19.3 s, ~10,500 images/s; validation
accuracy (validation_size=5000, seed 0) 91.26 %. (With the XLA Winograd path:
91.53 % mean at 28.4-30.6 s.) The peak
learning rate was chosen on a 5,000-image validation split (two seeds), never
on the test set. The first run on a machine also compiles the native kernels
once (12.7 s on 2 Zen 4 cores, cached in ~/.cache/fashion_jax).
"""

from fashion_jax import default_config


def get_config():
  config = default_config.get_config()  # configs/default.py is this.
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
