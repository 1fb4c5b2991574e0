"""`python -m fashion_jax`: names the commands (the package itself runs none); exit status 0 with
--help, else 2 (no command named)."""

import sys

# Not the docstring: `python -OO` (PYTHONOPTIMIZE=2) drops that, and the listing was a traceback.
COMMANDS = """\
  python -m fashion_jax.main --config=configs/default.py --workdir=DIR   train and evaluate
  python -m fashion_jax.predict --workdir=DIR PATH...                    classify images
  python -m fashion_jax.evaluate --workdir=DIR                           test-set report
  python -m fashion_jax.export --workdir=DIR --output=DIR                TensorFlow SavedModel
  python -m fashion_jax.benchmark --config=configs/default.py            train-step throughput

Each takes --help. Exit status: 0 with --help, else 2 (no command named)."""

if __name__ == "__main__":
  asked = any(arg in ("-h", "--help", "-?", "--helpfull") for arg in sys.argv[1:])
  print(("" if asked else "fashion_jax: error: name a command, e.g. python -m fashion_jax.main "
         "(the package runs none); the commands:\n") + COMMANDS,
        file=sys.stdout if asked else sys.stderr)
  sys.exit(0 if asked else 2)
