#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (e.g. v4-32, v5e-64).
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh /mnt/shared/fj_run [--config.KEY=VALUE ...]
#
# Installs the repository on all workers, then starts the same command on all of them at once;
# JAX reads the pod topology itself (config.distributed=on -> jax.distributed.initialize()).
# Each worker reads its own slice of every global batch. WORKDIR must be visible to every
# worker with the same path (a shared filesystem mount); metrics are written by worker 0.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
workdir=${1:?usage: launch/tpu_pod.sh WORKDIR [flags...]}
shift
repo=${REPO_URL:-$(git config --get remote.origin.url)}
branch=${BRANCH:-main}
config=${CONFIG:-configs/default.py}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  if [ ! -d fashion_jax ]; then git clone --branch $branch $repo fashion_jax; fi
  cd fashion_jax && git pull --ff-only
  # TPU VM images come with a working jax[tpu]: install it only where none is, never upgrade it.
  python3 -c 'import jax' 2>/dev/null || pip install -q 'jax[tpu]'
  pip install -q -e .
"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd fashion_jax && python -m fashion_jax.main --config=$config --workdir=$workdir \
    --config.distributed=on $*
"
