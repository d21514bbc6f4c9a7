#!/usr/bin/env bash
# torchrun, one node or several. On each node: NNODES, NODE_RANK (0 .. NNODES-1), MASTER_ADDR of node 0.
#   NPROC_PER_NODE=8 bash launch/torchrun.sh                                   # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh          # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh          # on node 1
# The several-node command is tested as two one-process "nodes" on one machine (tests/test_train.py:
# --nnodes 2 --node_rank 0/1 --nproc_per_node 1 --master_addr 127.0.0.1). A rank that dies makes the others exit
# with status 3 within run.heartbeat_timeout_s, and each node's torchrun with them.
set -euo pipefail
source "$(dirname "$0")/common.sh"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m pipeline.train --config "$CONFIG" "$@"
