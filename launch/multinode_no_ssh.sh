#!/usr/bin/env bash
# Multi-node training without ssh: start this script on every node yourself (or from a scheduler), each
# with its own NODE_RANK and the address of node 0. Two launchers are available:
#
#   LAUNCHER=deepspeed (default): deepspeed --no_ssh --node_rank N --master_addr ADDR, slots from HOSTFILE
#   LAUNCHER=torchrun:            torchrun --nnodes NNODES --node_rank N --master_addr ADDR,
#                                 NPROC_PER_NODE processes per node
#
# Example, two nodes (run the first line on node 0, the second on node 1):
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 HOSTFILE=launch/hostfile.example launch/multinode_no_ssh.sh CONFIG.toml
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=launch/hostfile.example launch/multinode_no_ssh.sh CONFIG.toml
#
# Every node needs the same repository path and virtualenv; run_dir should be on a shared file system.
# If one node dies, the others stop on their own: a collective fails, or the step watchdog
# (dist.watchdog_minutes) ends the rank with a message; the launcher then stops the node's other ranks.
set -euo pipefail
config=${1:?usage: NODE_RANK=n MASTER_ADDR=addr $0 CONFIG.toml [section.key=value ...] [--resume]}
shift
: "${NODE_RANK:?set NODE_RANK (0 on the master node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0, reachable from every node)}"
port=${MASTER_PORT:-29500}
venv=${VENV:-.venv}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(realpath "$venv")/torch_extensions}
case "${LAUNCHER:-deepspeed}" in
  deepspeed)
    exec "$venv/bin/deepspeed" --hostfile "${HOSTFILE:-launch/hostfile}" --no_ssh --node_rank "$NODE_RANK" \
        --master_addr "$MASTER_ADDR" --master_port "$port" \
        --no_local_rank --module calm_fast.cli train --config "$config" "$@" ;;
  torchrun)
    exec "$venv/bin/torchrun" --nnodes "${NNODES:?set NNODES}" --nproc_per_node "${NPROC_PER_NODE:?set NPROC_PER_NODE}" \
        --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$port" \
        -m calm_fast.cli train --config "$config" "$@" ;;
  *) echo "LAUNCHER must be deepspeed or torchrun, got ${LAUNCHER}" >&2; exit 2 ;;
esac
