#!/usr/bin/env bash
# One GPU (e.g. a 24 GB RTX 3090: CONFIG=gpt2-124m-curriculum with --set deepspeed.template=rtx3090
# --set curriculum.micro_batch_tokens=32768, as the recipe's 64 x 1024 micro-batches need about 30 GiB).
#   CONFIG=tiny-cpu bash launch/single_gpu.sh --output-dir runs/try
set -euo pipefail
source "$(dirname "$0")/common.sh"
exec deepspeed --num_gpus 1 --module pipeline.train --config "$CONFIG" "$@"
