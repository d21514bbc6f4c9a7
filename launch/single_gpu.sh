#!/usr/bin/env bash
# One GPU (e.g. a 24 GB RTX 3090: CONFIG=gpt2-124m-curriculum with --set deepspeed.template=rtx3090).
#   CONFIG=tiny-cpu bash launch/single_gpu.sh --output-dir runs/try
set -euo pipefail
source "$(dirname "$0")/common.sh"
exec deepspeed --num_gpus 1 --module pipeline.train --config "$CONFIG" "$@"
