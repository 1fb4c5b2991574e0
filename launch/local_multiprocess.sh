#!/usr/bin/env bash
# Multi-process data parallelism on one machine: N CPU processes, each with D devices,
# joined through a coordinator on localhost (gloo collectives). The same code path as a
# multi-host GPU/TPU job, so it is how multi-host behaviour is tested without a cluster.
#
#   launch/local_multiprocess.sh 2 2 /tmp/fj_mp --config=configs/default.py \
#       --config.idx_dir=../shared/data/fashion_mnist
#
# Usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS WORKDIR [main flags...]
# Each process logs to WORKDIR/process_<i>.log; if any process fails the others are stopped
# and the script exits non-zero. Runs $PYTHON (default: python3 from PATH).
set -uo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
num_processes=$1 devices=$2 workdir=$3
shift 3
port=${FASHION_JAX_PORT:-$((20000 + RANDOM % 20000))}
mkdir -p "$workdir"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; }
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices \
    "${PYTHON:-python3}" -m fashion_jax.main --workdir="$workdir" "$@" \
      --config.distributed=on --config.coordinator_address="localhost:$port" \
      --config.num_processes="$num_processes" --config.process_id="$i" \
      >"$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $num_processes processes (coordinator localhost:$port); logs in $workdir/process_*.log"

status=0
for ((n = 0; n < num_processes; n++)); do
  if ! wait -n "${pids[@]}"; then
    status=1
    echo "a process failed; stopping the others" >&2
    cleanup
    break
  fi
done
wait 2>/dev/null
for ((i = 0; i < num_processes; i++)); do
  grep -h "fashion_jax: error" "$workdir/process_$i.log" >&2 || true
done
tail -n 3 "$workdir/process_0.log"
exit $status
