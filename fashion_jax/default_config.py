"""Every config key, its default and what it means: the classic CNN with Adam.

`configs/default.py` is this config (the reference recipe); the other configs
start from it. It lives in the package because reading a saved run's
config.json fills the keys that run predates from here (inference.load_run_config),
and an installed package has no configs/ folder. Imports nothing but
ml_collections: loading a config needs no JAX.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = "fashion_mnist"  # tensorflow-datasets name.
  # tfds data_dir ("" = tfds default, ~/tensorflow_datasets); without TensorFlow, the verified
  # download goes to data_dir/<name>/idx ("" = the user's cache, fashion_jax/data/download.py).
  config.data_dir = ""
  # Folder with the four IDX files; "" = $FASHION_JAX_IDX_DIR (Fashion-MNIST, no data_dir), else
  # tfds where TensorFlow is installed, else the verified download (README "Data").
  config.idx_dir = ""
  config.shuffle_buffer = -1  # Unused by the in-memory pipeline; kept for tfds users' habits.

  # Model.
  config.model = "cnn"
  config.model_kwargs = ml_collections.ConfigDict()  # e.g. depth/width for "wrn".
  config.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32).
  # How convolutions are computed: auto | xla | im2col | winograd | native. "auto": XLA's own on
  # TPU/GPU; on CPU the native C++ conv+pool kernels where they apply (fashion_jax/kernels/
  # native.py; built on first use), else Winograd for a conv+pool pair with >= 8 input channels,
  # else im2col (BENCHMARKS.md). "winograd" forces it for every 3x3 stride-1 conv (others fall
  # back to im2col); "native" forces the native kernels.
  config.conv_impl = "auto"
  config.pool_impl = "auto"  # auto | xla | reshape | select (max-pooling not fused with a conv).

  # Optimisation.
  config.optimizer = "adam"  # adam | adamw | sgd (Nesterov momentum).
  config.learning_rate = 1e-3
  config.lr_schedule = "constant"  # constant | cosine (with warmup) | onecycle.
  config.warmup_steps = 0
  config.weight_decay = 0.0  # adamw's decoupled decay, or L2 for sgd.
  config.momentum = 0.9  # sgd only.
  config.label_smoothing = 0.0
  config.ema_decay = 0.0  # > 0: evaluate an exponential moving average of the parameters.

  # Augmentation, inside the jitted step.
  config.augment_translate = 0  # Pixels of random translation (pad + crop); 0 = off.
  config.augment_flip = False  # Random horizontal flips.
  config.random_erasing = 0.0  # Probability of erasing a random rectangle per image.
  config.batch_size = 32  # Global, across all devices and hosts.
  config.num_epochs = 5
  config.num_train_steps = -1  # -1: num_epochs * (train examples // batch_size).
  config.seed = 0
  # A step with a non-finite loss or gradient is never applied; then "stop" (error naming the
  # step and the last good checkpoint) or "skip" (warn and go on).
  config.on_nonfinite = "stop"
  # Bitwise-reproducible runs (and resumes). CPU and TPU already are; on GPU this turns on
  # XLA's deterministic ops (slower scatter/reductions).
  config.deterministic = False

  # Evaluation.
  config.eval_batch_size = 1000  # Global; the last batch is padded and masked.
  config.eval_every_steps = -1  # -1: at the end of every epoch.
  config.eval_flip_tta = False  # Average the logits of each test image and its mirror image.
  config.validation_size = 0  # Train examples held out for tuning (reported as val_*).

  # Logging and checkpoints.
  config.log_every_steps = 200
  config.checkpoint_every_steps = -1  # -1: at the end of every epoch.
  config.keep_checkpoints = 3
  config.async_checkpointing = True
  config.progress_bar = "auto"  # auto (on a terminal) | on | off: plain log lines instead.
  config.tensorboard_samples = 16  # Test images shown with their predictions at each eval (0 = off).

  # Devices.
  # auto | cpu | gpu | tpu. "auto": whatever JAX starts on, with a loud warning when the machine
  # has a GPU/TPU that JAX did not start (the likely cause named); gpu/tpu: that is an error;
  # cpu: stay on the CPU on purpose.
  config.backend = "auto"
  config.parallelism = "auto"  # auto | mesh | pmap | none.
  # Where the train batches come from: auto | host | device. "device": the train split lives on
  # the device(s) and each step gathers its batch inside the compiled window; "host": numpy
  # batches sent per window. Same examples at every step either way. auto = device.
  config.data_placement = "auto"
  # Steps per compiled call (a lax.scan "window"): -1 = auto (the largest divisor of the
  # checkpoint and eval intervals up to 100 on CPU, 1000 on GPU/TPU; where that is under half
  # the cap, as for a prime interval, the cap, with shorter windows up to each checkpoint and
  # eval step: fashion_jax/training/loop.py); N = at most N (1 = a step per call).
  config.steps_per_dispatch = -1
  # Multi-host (see README "Devices"): auto | on | off. "auto" joins when a coordinator is
  # given or a SLURM / Open MPI / TPU-pod launch is detected.
  config.distributed = "auto"
  config.coordinator_address = ""  # host:port of process 0; also JAX_COORDINATOR_ADDRESS.
  config.num_processes = -1
  config.process_id = -1
  config.distributed_timeout_s = 120

  return config
