r"""Trains and evaluates a Fashion-MNIST classifier.

  python -m fashion_jax.main --config=configs/default.py --workdir=/tmp/fj \
      [--config.idx_dir=FOLDER] [--config.KEY=VALUE ...]

Re-running the same command resumes from the latest checkpoint in --workdir.
Exit status: 0 trained and evaluated; 2 a problem with the input (config, data,
workdir): the one-line message says what to fix; 75 stopped by SIGTERM/SIGINT
(to any process of the job) after saving a checkpoint at the step every process
agreed on: re-run the same command to resume; 130 Ctrl-C before training holds
signals (nothing saved yet), or a second one while a single process saves its
stop checkpoint: re-run to resume; 143 SIGTERM before training holds signals or
after it has finished (nothing to save); 1 a crash (traceback). --help: the flags,
exit 0.
"""

import sys

from fashion_jax.support import errors
from fashion_jax.support import runtime

if __name__ == "__main__":  # First: the imports below take a second or more.
  runtime.end_at_once_on_interrupt(errors.INTERRUPTED, errors.EXIT_INTERRUPTED)

# pylint: disable=wrong-import-position
import contextlib

from absl import flags
from absl import logging

import fashion_jax  # Records the process start time first.
from fashion_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
cli.define_config_flag(None, "Path to a config file.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.refuse_arguments(argv)
  cli.refuse_ignored_epochs(FLAGS.config)
  cli.refuse_config_mistakes(FLAGS.config, FLAGS.workdir)  # Before JAX's import.
  cli.quiet_console()
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import config_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import backends, compile_cache  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import parallel  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import faults  # pylint: disable=g-import-not-at-top
  from fashion_jax.support.errors import UserError  # pylint: disable=g-import-not-at-top
  from fashion_jax.training import stops, train  # pylint: disable=g-import-not-at-top

  with contextlib.ExitStack() as held:
    try:
      config_lib.validate(FLAGS.config, warn=False)  # Training's own check warns.
      backends.request(FLAGS.config.backend, FLAGS.config.deterministic)
      parallel.initialize_distributed(FLAGS.config)
      # Joined: a signal from here on stops training at its first boundary (see stops.py).
      stop = held.enter_context(stops.StopRequest())
      faults.maybe_signal("joined")  # Tests: SIGTERM right after joining.
      backends.check(FLAGS.config.backend)
      compile_cache.enable()  # Before the first compile (GPU/TPU; off for multi-process CPU).
    except UserError as e:
      cli.fail(str(e))
    logging.info("fashion_jax %s, JAX %s, backend %s, process %d of %d", fashion_jax.__version__,
                 jax.__version__, jax.default_backend(), jax.process_index(), jax.process_count())
    logging.info("devices: %s (local %d)", jax.devices(), jax.local_device_count())
    try:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except UserError as e:
      cli.fail(str(e))
    except stops.Preempted as e:
      stop.saved()  # A signal from here on: still 75 (see there).
      print(f"fashion_jax: {e}", file=sys.stderr)
      sys.exit(stops.EXIT_PREEMPTED)


if __name__ == "__main__":
  runtime.reexec_with_tuned_malloc("fashion_jax.main", hold_interrupt=True)
  cli.run(main)
