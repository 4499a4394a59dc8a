#!/usr/bin/env bash
# Start N processes of one command on this machine, as one multi-process JAX job.
#
#   launch/local.sh N [--cpu K] [--gpus-per-process G] -- CMD ...
#
#   launch/local.sh 2 --cpu 4 -- .venv/bin/python -m bagel_jax.train --config configs/tiny.py \
#       --config.train.mesh=data=2,fsdp=4 --workdir /tmp/run      # 2 processes x 4 CPU devices
#   launch/local.sh 8 --gpus-per-process 1 -- .venv/bin/python -m bagel_jax.train ...   # one GPU each
#
# Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1:PORT), JAX_NUM_PROCESSES and
# JAX_PROCESS_ID; bagel_jax.sharding.initialize_distributed() (called by bagel_jax.train) reads
# them and calls jax.distributed.initialize (with gloo CPU collectives on CPU). Process i's
# output goes to stdout prefixed "[i]"; the script exits with the first non-zero status, and
# stops the other processes when one fails.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
N="$1"; shift
CPU=""; GPP=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --cpu) CPU="$2"; shift 2 ;;
    --gpus-per-process) GPP="$2"; shift 2 ;;
    *) echo "local.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || { echo "local.sh: no command given (after --)" >&2; exit 2; }

PORT="${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
export JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES="$N"
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY  # proxies can stall the coordinator

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  (
    export JAX_PROCESS_ID="$i"
    if [[ -n "$CPU" ]]; then
      export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU}"
    fi
    if [[ -n "$GPP" ]]; then
      export CUDA_VISIBLE_DEVICES="$(seq -s, $((i * GPP)) $((i * GPP + GPP - 1)))"
    fi
    exec "$@" > >(sed -u "s/^/[$i] /") 2>&1
  ) &
  pids+=("$!")
done

status=0
for p in "${pids[@]}"; do
  rc=0
  wait "$p" || rc=$?
  if [[ $rc -ne 0 ]]; then
    [[ $status -eq 0 ]] && status=$rc
    cleanup
  fi
done
exit "$status"
