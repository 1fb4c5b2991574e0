#!/usr/bin/env bash
# Multi-process data parallelism on one machine: N CPU processes, each with D devices,
# joined through a coordinator on localhost (gloo collectives). The same code path as a
# multi-host GPU/TPU job, so it is how multi-host behaviour is tested without a cluster.
#
#   launch/local_multiprocess.sh 2 2 /tmp/fj_mp --config=configs/default.py \
#       --config.idx_dir=../shared/data/fashion_mnist
#
# Usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS WORKDIR [main flags...]
# WORKDIR: a local folder, or a Cloud Storage one (gs://bucket/run, as on a TPU pod) with
# FASHION_JAX_LOG_DIR set. Each process logs to WORKDIR/process_<i>.log, or where set to
# FASHION_JAX_LOG_DIR/process_<i>.log (a local folder; one launcher at a time). If any process
# fails, the others are stopped (SIGTERM, then SIGKILL after GRACE_S seconds, default 30: a process
# waiting in a collective for one that died would wait for JAX's heartbeat timeout) and the script
# exits with that process's status (2: fix the input its one-line error names; 1: a crash); if the
# job was stopped by a signal (INT, TERM or HUP to this script, or any signal to one process) it
# exits 75 once every process has saved, or 130/143 where the signal came before training held it
# (nothing saved yet); bad arguments to this script exit 2. Needs bash 5.1 or later (wait -p). Runs
# $PYTHON (default: python3 from PATH), e.g. PYTHON=.venv/bin/python. FASHION_JAX_PORT: the
# coordinator's port (default: a free one).
set -uo pipefail
set -m  # Each process in its own process group: a Ctrl-C reaches this script only, which forwards
        # it once (a process signalled twice mid-save would leave the others waiting in it).
usage_error() {
  echo "local_multiprocess.sh: error: $1" >&2
  echo "usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS WORKDIR [main flags...]" >&2
  exit 2
}
if [ $# -lt 3 ]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
# `wait -p` (bash 5.1): without it the loop below found no finished process, forever.
(( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501 )) ||
  usage_error "needs bash 5.1 or later (this is $BASH_VERSION); run it with a newer bash"
grace=${GRACE_S:-30}
[[ $grace =~ ^[0-9]+$ ]] || usage_error "GRACE_S=$grace is not a whole number of seconds"
num_processes=$1 devices=$2 workdir=$3
shift 3
[[ $num_processes =~ ^[1-9][0-9]{0,3}$ ]] ||
  usage_error "NUM_PROCESSES=$num_processes is not a positive whole number (e.g. 2)"
[[ $devices =~ ^[1-9][0-9]{0,3}$ ]] ||
  usage_error "DEVICES_PER_PROCESS=$devices is not a positive whole number (e.g. 2)"
[[ -n $workdir && $workdir != -* ]] ||
  usage_error "WORKDIR=$workdir: give the run's folder as the third argument, before the flags"
python=${PYTHON:-python3}
command -v "$python" >/dev/null ||
  usage_error "PYTHON=$python: no such command; set PYTHON to the interpreter fashion_jax is installed in"
# A free port the kernel picks (a random one could be in use: another job's coordinator, which
# processes 1 and up joined before process 0 found the port taken). Its last line: a $PYTHON that
# is a wrapper may print first; one that cannot run it gets a random port, as before. (The port is
# from the range the system also gives outgoing connections: one could take it first, rarely.)
port=${FASHION_JAX_PORT:-}
if [ -z "$port" ]; then
  port=$("$python" -c 'import socket
with socket.socket() as s:
  s.bind(("127.0.0.1", 0))
  print(s.getsockname()[1])' 2>/dev/null | tail -n 1) || port=""
  [[ $port =~ ^[0-9]+$ ]] || port=$((20000 + RANDOM % 20000))
fi
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] ||
  usage_error "FASHION_JAX_PORT=$port is not a TCP port (1-65535)"
logs=${FASHION_JAX_LOG_DIR:-$workdir} logs_name=WORKDIR
[ -z "${FASHION_JAX_LOG_DIR:-}" ] || logs_name=FASHION_JAX_LOG_DIR
[[ $logs != *://* ]] || usage_error "$logs_name=$logs is a URL; the processes log into it: \
set FASHION_JAX_LOG_DIR to a local folder for their logs"
mkdir -p -- "$logs" 2>/dev/null && [ -w "$logs" ] ||
  usage_error "$logs_name=$logs: cannot create or write that folder; pass a writable path"
# The logs are written before the processes check WORKDIR: in a folder another user owns or every
# user may write (the processes refuse it), a link planted as process_0.log took the log over
# whatever file it named (a run in the README's /tmp/fj_mp overwrote the file of the user's own).
if [ "${FASHION_JAX_TRUST_WORKDIR:-}" != 1 ]; then
  trust="or set FASHION_JAX_TRUST_WORKDIR=1 if nobody else can reach it (a mount that shows another owner or 0777)"
  [ -O "$logs" ] || usage_error "$logs_name=$logs belongs to another user, who could put links \
there that the logs would be written through; use a folder of your own, $trust"
  [ -z "$(find "$logs" -maxdepth 0 -perm -0002)" ] || usage_error "$logs_name=$logs is writable by \
every user, who could put links there that the logs would be written through; chmod o-w it, use \
another folder, $trust"
fi

# A run holding WORKDIR's lock (fashion_jax/training/workdir.py) is training there: refused now,
# before the logs below are truncated (each process would refuse too, but only after that).
lock="$workdir/.fashion_jax.lock"
if [[ $workdir != *://* ]] && [ -f "$lock" ] && command -v flock >/dev/null &&
    ! flock -n "$lock" true 2>/dev/null; then
  echo "local_multiprocess.sh: error: another run (pid $(tr -dc 0-9 <"$lock" | head -c 12)) is" \
    "training into $workdir; wait for it to end, or use another WORKDIR" >&2
  exit 2
fi

# One launcher at a time writes process_<i>.log into a log folder: a second (another WORKDIR, e.g.
# two gs:// runs sharing FASHION_JAX_LOG_DIR) truncated the first's logs, and the first's summary
# then printed the other run's lines. The lock (on the folder itself: no file left there) is held
# by this script and its processes.
if command -v flock >/dev/null; then
  exec {logs_lock}<"$logs"
  flock -n "$logs_lock" || usage_error "another launcher is writing its processes' logs into \
$logs; wait for it to end, or set FASHION_JAX_LOG_DIR to another folder"
fi

pids=()
declare -A index_of  # pid -> process index, to name the failed process's log.
cleanup() { kill "${pids[@]}" 2>/dev/null; }
# A signal to this script goes to every process: they stop at one agreed step, save there,
# and exit 75 ("preempted: re-run to resume"), which this script then returns too.
signalled=0
trap 'signalled=1; kill -TERM "${pids[@]}" 2>/dev/null' TERM HUP  # HUP: the terminal closed.
trap 'signalled=1; kill -INT "${pids[@]}" 2>/dev/null' INT

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices \
    "$python" -m fashion_jax.main --workdir="$workdir" "$@" \
      --config.distributed=on --config.coordinator_address="localhost:$port" \
      --config.num_processes="$num_processes" --config.process_id="$i" \
      >"$logs/process_$i.log" 2>&1 &
  pids+=($!)
  index_of[$!]=$i
done
set +m  # Started in their own groups; no job-control notices ("Terminated ...") from here on.
echo "started $num_processes processes (coordinator localhost:$port); logs in $logs/process_*.log"

status=0 running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  finished=""
  wait -n -p finished "${running[@]}" 2>/dev/null
  rc=$?
  if [ -z "${finished:-}" ]; then
    [ $rc -eq 127 ] || continue  # Interrupted by a forwarded signal: keep waiting.
    # 127, "no such job": a process that ended while a trap ran left the job table (it looped
    # here for ever); `wait PID` still has its status.
    for pid in "${running[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        finished=$pid
        wait "$pid" 2>/dev/null
        rc=$?
        break
      fi
    done
    [ -n "$finished" ] || continue
  fi
  left=()
  for pid in "${running[@]}"; do [ "$pid" != "$finished" ] && left+=("$pid"); done
  running=("${left[@]}")
  if [ $rc -eq 75 ]; then
    status=75  # Preempted: the others stop at the same step; let them finish saving.
  elif [ $signalled = 1 ] && { [ $rc -eq 130 ] || [ $rc -eq 143 ]; }; then
    status=$rc  # The signal this script passed on came before training held it: nothing to save.
  elif [ $rc -ne 0 ]; then
    status=$rc  # The first failure's own status (2: bad input, 1: a crash); the rest are stopped.
    failed_log="$logs/process_${index_of[$finished]}.log"
    echo "process ${index_of[$finished]} failed (exit $rc; its log: $failed_log); stopping the others" >&2
    cleanup
    break
  fi
done
# Every process reaped before this script ends (a signal interrupts `wait`: it had returned with
# processes still saving, orphaned); after a failure, SIGKILL for those still there after GRACE_S.
deadline=$((SECONDS + grace))
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do
    if [ $status -ne 0 ] && [ $status -ne 75 ] && [ $SECONDS -ge $deadline ]; then
      kill -KILL "$pid" 2>/dev/null
    fi
    sleep 0.2
  done
  wait "$pid" 2>/dev/null
done
for ((i = 0; i < num_processes; i++)); do
  grep -h "^fashion_jax: " "$logs/process_$i.log" 2>/dev/null
done | awk '!seen[$0]++' >&2  # The same error from every process is said once.
if [ $status -eq 0 ] || [ $status -eq 75 ]; then
  tail -n 3 "$logs/process_0.log"
elif [ -n "${failed_log:-}" ] && [ $status -ne 2 ]; then  # A crash: the end of its traceback
  tail -n 5 "$failed_log" >&2  # (2 said it in one line above).
fi
exit $status
