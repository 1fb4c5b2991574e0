#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (e.g. v4-32, v5e-64).
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh /mnt/shared/fj_run [--config.KEY=VALUE ...]
#
# Installs the repository on all workers, then starts the same command on all of them at once;
# JAX reads the pod topology itself (config.distributed=on -> jax.distributed.initialize()).
# Each worker reads its own slice of every global batch. WORKDIR: a Cloud Storage folder
# (gs://bucket/run) or an absolute path every worker mounts; metrics are written by worker 0.
#   REPO_URL  the repository the workers clone (default: this checkout's remote.origin.url)
#   BRANCH    the branch they check out (default: main; not your local branch or changes)
#   CONFIG    the config file (default: configs/default.py), unless the flags give --config=
#   PYTHON    the interpreter on the workers (default: python3)
# Exit status: the workers' (0 done, 2 bad input, 75 stopped by a signal after saving: re-run to
# resume, 1 a crash, 128+N killed by signal N); 2 for bad arguments here. To stop a run at a
# common step with a checkpoint, press Ctrl-C (or send this script INT, TERM or HUP): it runs
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
#       --command='pkill -TERM -u "$USER" -f "^[^ ]*python[^ ]* (-[XW] [^ ]+ |-[^ ]+ )*-m fashion_jax[.]main"'
# (which also works from another machine) and waits for the workers to save; a second INT or
# TERM (not a hang-up) ends the ssh sessions, sends the workers SIGKILL and exits 137 (a worker
# that hung in the stop, or a stop that could not reach them: the last checkpoint is kept). The ssh sessions
# carry no terminal, so a lost connection does not stop the workers: that command does. (The
# pattern matches the Python process only, not the shell that started it: a shell killed by
# the signal would make ssh exit 255, which gcloud retries.)
set -euo pipefail
usage_error() {
  echo "tpu_pod.sh: error: $1" >&2
  echo "usage: TPU_NAME=... ZONE=... launch/tpu_pod.sh WORKDIR [main flags...]" >&2
  exit 2
}
[ -n "${TPU_NAME:-}" ] || usage_error "TPU_NAME is not set: the name of the TPU VM pod slice"
[ -n "${ZONE:-}" ] || usage_error "ZONE is not set: the zone of the pod slice (e.g. us-central2-b)"
command -v gcloud >/dev/null || usage_error "gcloud is not installed (it reaches the workers): \
install the Google Cloud CLI and sign in (gcloud auth login)"
[ $# -ge 1 ] || usage_error "WORKDIR is missing"
workdir=$1
shift
[[ $workdir == /* || $workdir == gs://?* ]] || usage_error "WORKDIR=$workdir: give a gs:// \
folder or an absolute path on a filesystem every worker mounts (a relative one would be each \
worker's own folder)"
here=$(cd "$(dirname "$0")/.." && pwd)
repo=${REPO_URL:-$(git -C "$here" config --get remote.origin.url || true)}
[ -n "$repo" ] || usage_error "this checkout has no remote.origin.url; set REPO_URL to the \
repository the workers should clone"
branch=${BRANCH:-main}
python=${PYTHON:-python3}
# The config file first: ml_collections refuses a --config.KEY before it (this script's own were).
config=(--config="${CONFIG:-configs/default.py}") rest=()
while [ $# -gt 0 ]; do
  case $1 in
    --config=*) config=("$1") ;;
    --config) [ $# -ge 2 ] || usage_error "--config needs a file"; config=("$1" "$2"); shift ;;
    *) rest+=("$1") ;;
  esac
  shift
done
flags=("${config[@]}" --workdir="$workdir" --config.distributed=on --config.backend=tpu
       ${rest[@]+"${rest[@]}"})  # (Bash 3.2, macOS's, calls an empty array unbound under set -u.)
q() { printf '%q ' "$@"; }  # Quoted for the workers' shell: paths, JSON and $ arrive intact.

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  if [ ! -d fashion_jax ]; then git clone --quiet $(q "$repo") fashion_jax; fi
  cd fashion_jax
  git remote set-url origin $(q "$repo")
  # (Two lines: set -e does not stop at a failure left of &&, and a fetch that failed ran the old code.)
  git fetch --quiet origin $(q "$branch")
  git checkout --quiet -B $(q "$branch") FETCH_HEAD
  # TPU VM images come with a working jax[tpu]: install it only where none is, never change it
  # (the installed jax, jaxlib and libtpu are pinned: an older jax fails here, not at run time).
  $(q "$python") -c 'import jax' 2>/dev/null || $(q "$python") -m pip install -q 'jax[tpu]'
  pins=\$(mktemp)
  $(q "$python") -m pip list --format=freeze 2>/dev/null | grep -iE '^(jax|jaxlib|libtpu)==' \
    >\"\$pins\" || true
  $(q "$python") -m pip install -q -e .[gcs] -c \"\$pins\"
  rm -f \"\$pins\"
"
signal_workers() {  # $1: TERM or KILL, to each worker's training process (not its shell).
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="pkill -$1 -u \"\$USER\" -f '^[^ ]*python[^ ]* (-[XW] [^ ]+ |-[^ ]+ )*-m fashion_jax[.]main'" ||
    true
}
# (|| true on the lines: after a hang-up stderr is gone, and set -e would end the script there.)
stop_workers() {
  # A second INT or TERM: where the first could not stop them. A hang-up now (the terminal closed
  # while they save) changes nothing: the stop under way goes on.
  trap stop_at_once INT TERM
  trap : HUP
  echo "tpu_pod.sh: stopping the workers at a common step; they save a checkpoint and exit (a" \
    "second signal stops them at once)" >&2 || true
  signal_workers TERM
}
stop_at_once() {
  trap : INT TERM HUP
  echo "tpu_pod.sh: stopping the workers at once (SIGKILL, no checkpoint; sent in the" \
    "background): re-run to resume from the last checkpoint" >&2 || true
  kill -KILL -- -"$job" 2>/dev/null || true  # The ssh sessions first, where a worker hangs,
  signal_workers KILL &  # then the workers, unwaited: where they cannot be reached, gcloud
}                        # retries for minutes.
# In a process group of its own (set -m), so that Ctrl-C reaches this script alone: gcloud's ssh
# sessions carry no terminal, and killing them left training running on every worker.
# `; exit $?` keeps the workers' shell above Python (bash execs a last command in its place): a
# run killed by a signal made ssh exit 255, which gcloud takes for a failed connection and
# retries -- the whole command, 10 times; the shell reports 128+N instead.
# </dev/null: ssh reads its stdin, and a terminal read from a background group stopped gcloud
# (SIGTTIN; job control leaves a background job the terminal): the workers never started.
trap stop_workers INT TERM HUP
set -m
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd fashion_jax && $(q "$python") -m fashion_jax.main $(q "${flags[@]}"); exit \$?
" </dev/null &
job=$!
set +m
while kill -0 "$job" 2>/dev/null; do
  wait "$job" || true  # Returns early when a trap runs: wait again.
done
wait "$job"  # Its status (set -e: the script's), kept by bash once it has ended.
