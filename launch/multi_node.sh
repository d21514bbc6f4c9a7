#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher, without ssh: run this on every node, each with its NODE_RANK (its
# line in the hostfile, from 0). Each node's launcher starts that node's ranks (one per slot) and they meet at
# MASTER_ADDR, node 0's address. HOSTFILE lists "name slots=N" per node (see hostfile.example).
# Every node needs the same checkout, environment and data path, and a shared filesystem for the run directory
# (all ranks write their checkpoint shards into it).
#   HOSTFILE=launch/hostfile NODE_RANK=0 MASTER_ADDR=10.0.0.1 CONFIG=gpt2-124m-curriculum bash launch/multi_node.sh
#   HOSTFILE=launch/hostfile NODE_RANK=1 MASTER_ADDR=10.0.0.1 CONFIG=gpt2-124m-curriculum bash launch/multi_node.sh
# This exact command is tested as two one-process "nodes" on one machine (tests/test_multinode.py: a hostfile of
# "node-0 slots=1" and "node-1 slots=1", and one of "slots=2" lines with INCLUDE="node-0:0@node-1:1";
# MASTER_ADDR=127.0.0.1; with --no_ssh the names are labels, never resolved).
# Without --no_ssh and --node_rank, DeepSpeed would start every node from the first one over ssh (pdsh): not tested.
# A rank that dies makes the others exit with status 3 within run.heartbeat_timeout_s, and each launcher with them.
# INCLUDE (optional) picks GPUs per node, DeepSpeed's --include: "node-0:0@node-1:1" with "slots=2" lines runs node 0
# on its GPU 0 and node 1 on its GPU 1 (how two "nodes" share one 2-GPU host; tested that way on two H200s).
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}"
: "${NODE_RANK:?set NODE_RANK to this node's line in the hostfile, counted from 0}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first node's address}"
exec deepspeed --hostfile "$HOSTFILE" ${INCLUDE:+--include "$INCLUDE"} --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --module pipeline.train --config "$CONFIG" "$@"
