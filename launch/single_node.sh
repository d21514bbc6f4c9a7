#!/usr/bin/env bash
# All GPUs of one node through the DeepSpeed launcher. NUM_GPUS defaults to every visible GPU.
#   CONFIG=gpt2-124m-curriculum NUM_GPUS=8 bash launch/single_node.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
NUM_GPUS="${NUM_GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" --module pipeline.train \
    --config "$CONFIG" "$@"
