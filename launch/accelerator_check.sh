#!/usr/bin/env bash
# The accelerator check: fashion_jax on one GPU or TPU chip in <= 9 minutes, one JSON file.
#
#   launch/accelerator_check.sh IDX_DIR [OUTPUT.json]
#
# Needs a preinstalled JAX stack for the chip (jax + its CUDA plugin or libtpu, flax, optax,
# orbax-checkpoint) and an IDX folder; no network. WHEELS=FOLDER installs ml-collections and
# tensorboardX (pure Python) from wheels in FOLDER first, without touching anything else.
# What it measures: launch/accelerator_check.py. Runs $PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
idx_dir=${1:?usage: launch/accelerator_check.sh IDX_DIR [OUTPUT.json]}
output=${2:-accelerator_check.json}
python=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
  "$python" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" \
    ml-collections tensorboardX
fi
"$python" -c "import jax, flax, optax, orbax.checkpoint, ml_collections, tensorboardX" || {
  echo "accelerator_check: error: a package is missing (above); install it, or pass WHEELS=FOLDER" >&2
  exit 2
}
unset JAX_PLATFORMS
exec "$python" launch/accelerator_check.py --idx_dir="$idx_dir" --output="$output" \
  --budget_s="${BUDGET_S:-540}"
