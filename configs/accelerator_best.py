r"""State of the art for a TPU/GPU: Wide-ResNet-28-10 with random erasing.

The recipe of the Random Erasing paper (Zhong et al. 2017, Fashion-MNIST
WRN-28-10 + RE: 96.35%), on the current best practices: SGD with Nesterov
momentum 0.9, lr 0.1 at batch 128 scaled linearly with the batch, weight decay
5e-4, warmup + cosine schedule, 200 epochs, random erasing p=0.5, flips and
+-4 px translations, EMA of the weights and flip test-time augmentation at
evaluation; bfloat16 compute with float32 parameters. Expected >= 96.5% test
accuracy (published: WRN-28-10 + RE 96.35%, WRN-40-4 96.7%); not yet
measured on an accelerator.

  python -m fashion_jax.main --config=configs/accelerator_best.py --workdir=/tmp/fj_wrn

Colab TPU or GPU: see launch/colab.ipynb. 5,000 training images are held out
for validation. Expected time, from XLA's FLOP count of this train step
(21.7 GFLOP per training image, forward + backward, 36.5 M parameters; see
BENCHMARKS.md "Recipes"): 55,000 images x 200 epochs x 21.7 GFLOP = 2.4e17
FLOP, i.e. about 1 h on a TPU v5e-1 (197 TFLOP/s bf16) or a v2-8 (180) at an
assumed 35% of peak, about 2 h on a Colab L4 GPU (121 TFLOP/s bf16, at 25%). A T4
has no bfloat16 tensor cores (bfloat16 runs at its 8.1 TFLOP/s float32 rate):
about 33 h there, longer than a Colab session, so the notebook runs
configs/cpu_best.py on a T4 or V100.
On 2 CPU cores (~80 GFLOP/s achieved) it would take about a month; a shrunk
version runs in the tests (tests/test_recipes.py).
"""

from fashion_jax import default_config


def get_config():
  config = default_config.get_config()  # configs/default.py is this.
  config.model = "wrn"
  config.model_kwargs = {"depth": 28, "width": 10, "dropout_rate": 0.0}
  config.compute_dtype = "bfloat16"
  config.batch_size = 512
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = 0.4  # 0.1 per 128 images, scaled linearly.
  config.weight_decay = 5e-4
  config.lr_schedule = "cosine"
  config.warmup_steps = 500
  config.num_epochs = 200
  config.label_smoothing = 0.0
  config.ema_decay = 0.999
  config.augment_translate = 4
  config.augment_flip = True
  config.random_erasing = 0.5
  config.eval_flip_tta = True
  config.validation_size = 5000
  config.eval_batch_size = 1000
  config.eval_every_steps = 1070  # ~10 epochs at batch 512 on 55,000 images.
  config.log_every_steps = 107
  config.checkpoint_every_steps = 1070
  config.keep_checkpoints = 2
  return config
