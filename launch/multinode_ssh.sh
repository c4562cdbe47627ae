#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher, which starts every node's processes over ssh.
# Run it once, on the first host of the hostfile, from the repository root:
#
#   HOSTFILE=launch/hostfile.example launch/multinode_ssh.sh configs/experiments/ilsvrc_resnet50_calm-em.toml \
#       [section.key=value ...] [--resume]
#
# Needs: passwordless ssh between the nodes, the same repository path and virtualenv on every node, and
# run_dir on a shared file system (checkpoints are written by every rank and resumed by every rank).
set -euo pipefail
config=${1:?usage: $0 CONFIG.toml [section.key=value ...] [--resume]}
shift
hostfile=${HOSTFILE:-launch/hostfile}
venv=${VENV:-.venv}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(realpath "$venv")/torch_extensions}
# --no_local_rank: calm-fast reads LOCAL_RANK from the environment; --module: run calm_fast.cli.
exec "$venv/bin/deepspeed" --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module calm_fast.cli train --config "$config" "$@"
