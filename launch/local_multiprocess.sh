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
# and the script exits 1; if the job was stopped by a signal (to this script or to any one
# process) it exits 75 once every process has saved. Runs $PYTHON (default: python3 from PATH).
set -uo pipefail
set -m  # Each process in its own process group: a Ctrl-C reaches this script only, which forwards
        # it once (a process signalled twice mid-save would leave the others waiting in it).
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
# A signal to this script goes to every process: they stop at one agreed step, save there,
# and exit 75 ("preempted: re-run to resume"), which this script then returns too.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
trap 'kill -INT "${pids[@]}" 2>/dev/null' INT

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices \
    "${PYTHON:-python3}" -m fashion_jax.main --workdir="$workdir" "$@" \
      --config.distributed=on --config.coordinator_address="localhost:$port" \
      --config.num_processes="$num_processes" --config.process_id="$i" \
      >"$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $num_processes processes (coordinator localhost:$port); logs in $workdir/process_*.log"

status=0 running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  finished=""
  wait -n -p finished "${running[@]}"
  rc=$?
  [ -z "${finished:-}" ] && continue  # Interrupted by a forwarded signal: keep waiting.
  left=()
  for pid in "${running[@]}"; do [ "$pid" != "$finished" ] && left+=("$pid"); done
  running=("${left[@]}")
  if [ $rc -eq 75 ]; then
    status=75  # Preempted: the others stop at the same step; let them finish saving.
  elif [ $rc -ne 0 ]; then
    status=1
    echo "a process failed (exit $rc); stopping the others" >&2
    cleanup
    break
  fi
done
wait 2>/dev/null
for ((i = 0; i < num_processes; i++)); do
  grep -h "^fashion_jax: " "$workdir/process_$i.log" >&2 || true
done
tail -n 3 "$workdir/process_0.log"
exit $status
