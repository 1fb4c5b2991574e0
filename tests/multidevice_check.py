"""Run in a subprocess with several CPU devices (see test_parallel.py).

Trains the tiny config under each parallelism mode from the same start and
prints, as JSON, each mode's logged losses and the max parameter difference
from the single-device run.
"""

import json
import os
import sys

import jax
import numpy as np

from fashion_jax import config_lib
from fashion_jax.model import steps
from fashion_jax.support import checkpointing, parallel
from fashion_jax.training import train


def final_state(config, workdir):
  model, tx = steps.create_model(config), steps.create_optimizer(config)
  init = steps.create_train_state(model, tx, config.seed, ema=config.ema_decay > 0)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=5)
  state = ckpt.restore(ckpt.latest_step(), parallel.Parallel("none").abstract_state(
      jax.eval_shape(lambda: init)), checkpointing.describe_state(config.model, init))
  ckpt.close()
  return jax.tree.map(np.asarray, state)


def main(root, idx_dir, out_dir, *modes):
  config = config_lib.load_file(os.path.join(root, "configs", "tiny.py"))
  config.idx_dir = idx_dir
  if modes and modes[0].startswith("model="):  # e.g. model=cnn_bn: BatchNorm across devices.
    config.model = modes[0][len("model="):]
    # Without dropout: its masks amplify the formulations' rounding (one device runs the native
    # kernels, several XLA's) past these tolerances within 20 steps. That each device draws its
    # rows of the global batch's masks and augmentation is checked exactly in test_recipes.py.
    config.model_kwargs = {"dropout_rate": 0.0} if config.model == "cnn_bn" else {}
    modes = modes[1:]
  results = {"device_count": jax.device_count()}
  states = {}
  for mode in modes:  # "mesh", or "mesh:host" for data_placement=host.
    config.parallelism, _, placement = mode.partition(":")
    config.data_placement = placement or "auto"
    workdir = os.path.join(out_dir, mode.replace(":", "_"))
    metrics = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      losses = [json.loads(l).get("train_loss") for l in f]
    states[mode] = final_state(config, workdir)
    results[mode] = {"losses": [l for l in losses if l is not None],
                     "eval_accuracy": metrics["eval_accuracy"]}
  for mode in modes[1:]:
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), states[modes[0]].params,
                         states[mode].params)
    results[mode]["max_param_diff"] = max(jax.tree.leaves(diffs))
    if jax.tree.leaves(states[mode].batch_stats):
      diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-6)),
                           states[modes[0]].batch_stats, states[mode].batch_stats)
      results[mode]["max_batch_stats_rel_diff"] = max(jax.tree.leaves(diffs))
  print("RESULT " + json.dumps(results))


if __name__ == "__main__":
  main(*sys.argv[1:])
