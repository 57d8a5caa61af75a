#!/usr/bin/env bash
# Starts N hica-jax processes on this machine, JAX's multi-controller runtime
# over localhost (CPU collectives through gloo), for testing multi-host code.
#
#   launch/local_multiprocess.sh -n 2 -d 2 -- --config configs/busi_fewshot.py:tiny
#
# -n processes, -d CPU devices per process, -p coordinator port, -l log
# folder. Everything after -- goes to `python -m hica_jax.main`.
# Logs: <logdir>/process_<i>.log (only process 0 logs at INFO).
set -euo pipefail
num=2; devices=2; port=12355; logdir="${TMPDIR:-/tmp}/hica_local_mp"
while getopts "n:d:p:l:" opt; do
  case $opt in
    n) num=$OPTARG ;; d) devices=$OPTARG ;; p) port=$OPTARG ;; l) logdir=$OPTARG ;;
    *) echo "usage: $0 [-n N] [-d DEVICES] [-p PORT] [-l LOGDIR] -- MAIN_ARGS" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
mkdir -p "$logdir"
pids=()
for ((i = 0; i < num; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" \
  JAX_NUM_PROCESSES="$num" JAX_PROCESS_ID="$i" \
    python -m hica_jax.main --distributed=on "$@" >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
# SIGTERM/SIGINT to this script reach every process: they checkpoint at one
# agreed step and exit 0, like a preempted job (rerun to resume).
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward TERM INT
status=0
for i in "${!pids[@]}"; do
  while :; do
    rc=0; wait "${pids[$i]}" || rc=$?
    # A trapped signal interrupts `wait` (rc > 128) while the process runs on.
    if [ "$rc" -gt 128 ] && kill -0 "${pids[$i]}" 2>/dev/null; then continue; fi
    break
  done
  if [ "$rc" != 0 ]; then
    echo "process $i failed (exit $rc); see $logdir/process_$i.log" >&2
    status=1
  fi
done
exit $status
