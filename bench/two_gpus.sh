#!/usr/bin/env bash
# Two GPUs of one host, through the DeepSpeed launcher (docs/BENCHMARKS.md, "Two GPUs", has the figures):
#   bash bench/two_gpus.sh scaling   # the shortened 124M curriculum: ZeRO 0 and 3 on 1 GPU (side by side, one GPU
#                                    # each), ZeRO 0, 2 and 3 on 2 GPUs; per-stage scaling reports, loss curves
#   bash bench/two_gpus.sh checks    # a 2-GPU ZeRO-2 checkpoint resumed on 1 GPU; a killed rank; two "nodes" of one
#                                    # GPU each through multi_node.sh (no ssh) and through torchrun.sh
# The recipe is gpt2-124m-curriculum (embedding padded to 50,304 rows: GPT-2 124M's shapes) shortened to 20 steps
# per stage: 80 steps, 23.6 M tokens, evaluations every 20 steps. Every stage keeps its global batch; 2 GPUs halve
# the accumulation (256 x 128 x 2 x 2 = 131,072 tokens per step at seq_len 128, 32 x 1024 x 8 x 2 = 524,288 at 1024).
# Micro-batches of 32,768 tokens, as the figures were measured (the recipe now has 65,536).
# Outputs go to OUT_DIR (default runs/two-gpus); a training run that finished there (summary.json) is not run again,
# so the script can be taken up where it stopped; the kill and two-node checks start afresh each time. CPT is the
# command (default curriculum-pretrain).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:?give scaling or checks}"
OUT_DIR="${OUT_DIR:-runs/two-gpus}"
CPT="${CPT:-curriculum-pretrain}"
RECIPE=gpt2-124m-curriculum
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
mkdir -p "$OUT_DIR"
[ -f data/python-stdlib/manifest.json ] || $CPT prepare-data --source python-stdlib --vocab-size 4096

SETS=(--set model.overrides.vocab_size=50304 --set run.eval_every=20 --set run.checkpoint_every=0
      --set run.export=false --set curriculum.micro_batch_tokens=32768)
for stage in 0 1 2 3; do
    SETS+=(--set "curriculum.stages.$stage.until_step=$((20 * (stage + 1)))"
           --set "curriculum.stages.$stage.warmup_steps=5")
done
ZERO2=(--set deepspeed.template=zero2)
ZERO3=(--set deepspeed.template=zero2 --set deepspeed.overrides.zero_optimization.stage=3)

on_gpus() {  # on_gpus GPUS PORT RUN [ARGS...]: train the shortened recipe on those GPUs of this host into OUT_DIR/RUN
    local gpus=$1 port=$2 run=$3
    shift 3
    if [ -f "$OUT_DIR/$run/summary.json" ]; then echo "$run: finished before, not run again"; return; fi
    echo "$(date +%T) $run on GPUs $gpus: $*"
    deepspeed --include "localhost:$gpus" --master_port "$port" --module pipeline.train --config "$RECIPE" \
        "${SETS[@]}" "$@" --output-dir "$OUT_DIR/$run" >> "$OUT_DIR/$run.log" 2>&1
}

if [ "$MODE" = scaling ]; then
    on_gpus 0 29500 zero0-1gpu & one=$!
    on_gpus 1 29501 zero3-1gpu "${ZERO3[@]}" & three=$!
    wait $one
    wait $three
    on_gpus 0,1 29500 zero0-2gpu
    on_gpus 0,1 29500 zero2-2gpu "${ZERO2[@]}"
    on_gpus 0,1 29500 zero3-2gpu "${ZERO3[@]}" --set run.export=true
    for run in zero0-2gpu zero2-2gpu zero3-1gpu; do
        $CPT bench --from-train "$OUT_DIR/$run" --against "$OUT_DIR/zero0-1gpu" --output "$OUT_DIR/$run-scaling.json"
    done
    $CPT bench --from-train "$OUT_DIR/zero3-2gpu" --against "$OUT_DIR/zero3-1gpu" \
        --output "$OUT_DIR/zero3-2gpu-scaling.json"
    $CPT compare "$OUT_DIR"/{zero0-1gpu,zero0-2gpu,zero2-2gpu,zero3-1gpu,zero3-2gpu} --output-dir "$OUT_DIR/compare"
    # the model exported from the ZeRO-3 checkpoint holds the weights the replica report hashed after training
    python3 - "$OUT_DIR/zero3-2gpu" <<'EOF'
import hashlib, json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
run = Path(sys.argv[1])
weights = hashlib.sha256()
for tensor in AutoModelForCausalLM.from_pretrained(run / "final").state_dict().values():
    weights.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
replicas = json.loads((run / "summary.json").read_text())["replicas"]["params_sha256"]
print(f"ZeRO-3 export: weights sha256 {weights.hexdigest()[:16]}, replica report {[h[:16] for h in replicas]}: "
      + ("the same" if set(replicas) == {weights.hexdigest()} else "DIFFERENT"))
EOF
elif [ "$MODE" = checks ]; then
    # a ZeRO-2 checkpoint of 2 GPUs at step 30 (inside stage 1), resumed on 1 GPU to step 40, uncompiled: converted
    # once to DeepSpeed's universal form, same data order and schedule; its losses against the 2-GPU run of `scaling`
    on_gpus 0,1 29500 resume-2to1 "${ZERO2[@]}" --set kernels.compile=false --max-steps 40 --stop-at-step 30
    on_gpus 0 29500 resume-2to1 "${ZERO2[@]}" --set kernels.compile=false --max-steps 40

    # kill -9 of rank 1 after 5 steps: the job must end non-zero within 60 s with the trainer's line naming the rank
    rm -rf "$OUT_DIR/killed" "$OUT_DIR/killed.log"
    on_gpus 0,1 29502 killed --set kernels.compile=false & job=$!
    until [ "$(cat "$OUT_DIR/killed/metrics.jsonl" 2>/dev/null | grep -c '"kind": "train"')" -ge 5 ]; do
        kill -0 $job 2>/dev/null || { echo "error: the run to kill ended first (see $OUT_DIR/killed.log)" >&2; exit 1; }
        sleep 0.5
    done
    pkill -9 -f -- "--local_rank=1 .*--output-dir $OUT_DIR/killed"
    killed_at=$(date +%s.%N)
    status=0
    wait $job || status=$?
    echo "killed rank 1 after $(grep -c '"kind": "train"' "$OUT_DIR/killed/metrics.jsonl") steps; the job ended" \
         "$(python3 -c "import time; print(f'{time.time() - $killed_at:.1f}')") s later with status $status"
    grep '^error:' "$OUT_DIR/killed.log" || true

    # two "nodes" of one GPU each on this host, 20 steps uncompiled: the DeepSpeed launcher without ssh, then torchrun
    wait_nodes() {  # wait_nodes NAME: both nodes' launchers must exit 0
        local status=0
        wait "${nodes[0]}" || status=$?
        wait "${nodes[1]}" || status=$?
        [ $status -eq 0 ] || { echo "error: a node of $1 exited with $status (see $OUT_DIR/$1-*.log)" >&2; exit 1; }
    }
    rm -rf "$OUT_DIR"/nodes-*
    printf 'node-0 slots=2\nnode-1 slots=2\n' > "$OUT_DIR/hostfile"
    for node in 0 1; do
        HOSTFILE="$OUT_DIR/hostfile" INCLUDE=node-0:0@node-1:1 NODE_RANK=$node MASTER_ADDR=127.0.0.1 \
            MASTER_PORT=29503 CONFIG=$RECIPE bash launch/multi_node.sh "${SETS[@]}" --max-steps 20 \
            --set kernels.compile=false --output-dir "$OUT_DIR/nodes-deepspeed" \
            > "$OUT_DIR/nodes-deepspeed-$node.log" 2>&1 &
        nodes[$node]=$!
    done
    wait_nodes nodes-deepspeed
    for node in 0 1; do
        CUDA_VISIBLE_DEVICES=$node NNODES=2 NODE_RANK=$node NPROC_PER_NODE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29504 \
            CONFIG=$RECIPE bash launch/torchrun.sh "${SETS[@]}" --max-steps 20 --set kernels.compile=false \
            --output-dir "$OUT_DIR/nodes-torchrun" > "$OUT_DIR/nodes-torchrun-$node.log" 2>&1 &
        nodes[$node]=$!
    done
    wait_nodes nodes-torchrun
    for run in nodes-deepspeed nodes-torchrun; do
        python3 -c "import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[1], 'world size', \
s['world_size'], 'steps', s['steps'], 'final loss', round(s['final_loss'], 4), 'replicas identical', \
s['replicas']['params_identical'])" "$OUT_DIR/$run/summary.json"
    done
else
    echo "error: MODE = '$MODE': give scaling or checks" >&2
    exit 2
fi
