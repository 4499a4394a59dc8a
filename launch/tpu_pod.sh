#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU pod slice (one JAX process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--setup] -- CMD ...
#
#   launch/tpu_pod.sh my-v5p-64 us-east5-a --setup -- \
#       .venv/bin/python -m bagel_jax.train --config configs/bagel_7b_mot.py \
#       --config.train.mesh=fsdp=-1 --workdir gs://BUCKET/runs/bagel
#
# --setup first copies this checkout to ~/bagel_jax on every worker (gcloud scp) and builds
# the venv there (python3.12, `pip install -e . jax[tpu]`). The command then runs in
# ~/bagel_jax on all workers at once (`--worker=all`) with BAGEL_DISTRIBUTED=1, so
# bagel_jax.sharding.initialize_distributed() calls jax.distributed.initialize() with no
# arguments: JAX detects the pod's coordinator, process count and ids itself. Every worker
# must use the same config, and a workdir all of them can reach (a GCS bucket) for Orbax.
# Extra gcloud flags (e.g. --project P): GCLOUD_FLAGS="--project P" launch/tpu_pod.sh ...
set -euo pipefail

if [[ $# -lt 2 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
TPU="$1"; ZONE="$2"; shift 2
SETUP=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --setup) SETUP=1; shift ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || { echo "tpu_pod.sh: no command given (after --)" >&2; exit 2; }
REPO="$(cd "$(dirname "$0")/.." && pwd)"
GC=(gcloud compute tpus tpu-vm)
read -r -a EXTRA <<< "${GCLOUD_FLAGS:-}"

if [[ $SETUP -eq 1 ]]; then
  tarball="$(mktemp --suffix=.tar.gz)"
  tar -C "$REPO" --exclude=.venv --exclude=.git -czf "$tarball" .
  "${GC[@]}" scp "$tarball" "$TPU:~/bagel_jax.tar.gz" --zone "$ZONE" --worker=all "${EXTRA[@]}"
  "${GC[@]}" ssh "$TPU" --zone "$ZONE" --worker=all "${EXTRA[@]}" --command \
    "mkdir -p ~/bagel_jax && tar -C ~/bagel_jax -xzf ~/bagel_jax.tar.gz && cd ~/bagel_jax && \
     python3.12 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.12.0.1'"
  rm -f "$tarball"
fi

CMD="$(printf '%q ' "$@")"
"${GC[@]}" ssh "$TPU" --zone "$ZONE" --worker=all "${EXTRA[@]}" --command \
  "cd ~/bagel_jax && BAGEL_DISTRIBUTED=1 $CMD"
