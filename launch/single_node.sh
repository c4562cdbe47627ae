#!/usr/bin/env bash
# One node, N processes (one per GPU; on CPU, gloo ranks): deepspeed launcher, or torchrun with LAUNCHER=torchrun.
#   NPROC=8 launch/single_node.sh configs/experiments/cub_resnet50_calm-em.toml [section.key=value ...]
# With one process, plain `calm-fast train --config ...` does the same without a launcher.
set -euo pipefail
config=${1:?usage: NPROC=n $0 CONFIG.toml [section.key=value ...] [--resume]}
shift
nproc=${NPROC:-1}
venv=${VENV:-.venv}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(realpath "$venv")/torch_extensions}
if [ "${LAUNCHER:-deepspeed}" = torchrun ]; then
  exec "$venv/bin/torchrun" --standalone --nproc_per_node "$nproc" -m calm_fast.cli train --config "$config" "$@"
fi
# A one-line hostfile gives the deepspeed launcher its slot count on CPU machines too.
hostfile=$(mktemp)
trap 'rm -f "$hostfile"' EXIT
echo "localhost slots=$nproc" > "$hostfile"
"$venv/bin/deepspeed" --hostfile "$hostfile" --no_ssh --node_rank 0 --master_addr 127.0.0.1 \
    --master_port "${MASTER_PORT:-29500}" --no_local_rank --module calm_fast.cli train --config "$config" "$@"
