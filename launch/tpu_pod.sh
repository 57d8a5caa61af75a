#!/usr/bin/env bash
# Runs hica-jax on a Cloud TPU VM slice (one host or a multi-host pod):
# creates the TPU VM unless it exists, copies this working tree to every
# worker, installs it, and starts `python -m hica_jax.main` on all workers
# at once (JAX's multi-controller runtime: one process per host).
#
#   launch/tpu_pod.sh --name=hica-v4 --zone=us-central2-b \
#       --accelerator-type=v4-16 [--project=P] [--spot] [--dry-run] -- \
#       --config configs/chestxray_fewshot.py --workdir=/mnt/shared/runs/cxr
#
# Everything after -- goes to hica_jax.main. The workdir must be storage
# every worker sees (Filestore/NFS, or a bucket mounted with gcsfuse; see
# --setup): each process writes its own checkpoint shards there. After a
# preemption, rerun the same command: the VM is reused (or recreated) and
# the run resumes from its newest checkpoint. --skip-copy skips copying and
# installing when the workers already have this version.
# --dry-run prints every command and runs none.
set -euo pipefail

name=""; zone=""; project=""; accelerator="v4-8"; version="tpu-ubuntu2204-base"
spot=0; dry_run=0; skip_copy=0; setup=""; remote_dir="hica-jax"
jax_pkg="jax[tpu]"
usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
  echo "options: --name --zone [--project] [--accelerator-type] [--version]" \
       "[--spot] [--setup=CMD] [--remote-dir=DIR] [--jax=PKG] [--skip-copy]" \
       "[--dry-run] -- MAIN_ARGS" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator-type=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --setup=*) setup=${1#*=} ;;
    --remote-dir=*) remote_dir=${1#*=} ;;
    --jax=*) jax_pkg=${1#*=} ;;
    --spot) spot=1 ;;
    --skip-copy) skip_copy=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (main's flags go after --)" >&2; usage ;;
  esac
  shift
done
[ -n "$name" ] || { echo "tpu_pod.sh: --name=TPU_VM_NAME is required" >&2; exit 2; }
[ -n "$zone" ] || { echo "tpu_pod.sh: --zone=ZONE is required" >&2; exit 2; }
[ $# -gt 0 ] || { echo "tpu_pod.sh: give hica_jax.main flags after --, e.g. -- --config configs/busi_fewshot.py" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
where=(--zone="$zone")
[ -n "$project" ] && where+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)

# Prints a command readably (quoting only what needs it), then runs it.
show() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "
    else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
run() {
  show "$@"
  [ "$dry_run" = 1 ] || "$@"
}

# 1. Create the TPU VM unless it exists (a preempted spot VM is recreated).
create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version")
[ "$spot" = 1 ] && create+=(--spot)
describe=("${tpu[@]}" describe "$name" "${where[@]}")
echo "$(show "${describe[@]}") >/dev/null 2>&1 || $(show "${create[@]}")"
if [ "$dry_run" = 0 ]; then
  "${describe[@]}" >/dev/null 2>&1 || "${create[@]}"
fi

# 2. Copy this working tree to every worker and install it there.
if [ "$skip_copy" = 0 ]; then
  tarball="${TMPDIR:-/tmp}/hica-jax-$$.tar.gz"
  run tar czf "$tarball" -C "$repo" --exclude=.git --exclude=runs --exclude='*.egg-info' .
  run "${tpu[@]}" scp "$tarball" "$name:hica-jax.tar.gz" "${where[@]}" --worker=all
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
    --command="mkdir -p $remote_dir && tar xzf hica-jax.tar.gz -C $remote_dir && pip install -q -e $remote_dir '$jax_pkg'"
  [ "$dry_run" = 1 ] || rm -f "$tarball"
fi
[ -n "$setup" ] && run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$setup"

# 3. Start main on every worker; JAX finds the other hosts by itself.
main_args=$(printf '%q ' "$@")
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
  --command="cd $remote_dir && python -m hica_jax.main --distributed=on ${main_args% }"
