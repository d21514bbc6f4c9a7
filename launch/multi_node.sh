#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher (it starts the ranks over ssh, so run this on the first node).
# HOSTFILE lists "hostname slots=N" per node (see hostfile.example); MASTER_ADDR is the first node's address.
# Every node needs the same checkout, environment and data path (a shared filesystem for the run directory:
# all ranks write their checkpoint shards into it).
#   HOSTFILE=launch/hostfile MASTER_ADDR=10.0.0.1 CONFIG=gpt2-124m-curriculum bash launch/multi_node.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first node's address}"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    --module pipeline.train --config "$CONFIG" "$@"
