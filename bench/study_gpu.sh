#!/usr/bin/env bash
# The GPU study of docs/RESULTS.md: GPT-2 124M (vocabulary 16,384) on two corpora prepared from the machine's own
# Python installation, 8,388,608 tokens per run, configs in bench/study-gpu/, each corpus through bench/study.sh:
#   bash bench/study_gpu.sh      # OUT_DIR (default runs/study-gpu) gets runs/study-gpu/<corpus>/
# python-packages: the installed packages' .py files; python-docs: natural language, the docstrings, package
# descriptions and documentation files of the standard library and the packages (`prepare-data --help`).
# Each corpus takes its steps from most to least needed (the sweep, the length and batch variants, the other
# curricula, a second seed of the baseline and of the best curriculum, stability at the baseline's first unstable
# LR, the baseline and the best curriculum at 4x the tokens, the seed's LR rule, lr-find), so a study cut short by
# time still has the main comparison. With two GPUs or more each corpus has its own GPU; with one they take turns.
# Round 0 runs the curriculum's first two steps once per corpus: on a fresh machine that builds DeepSpeed's FusedAdam
# and compiles the length-warmup shapes (about 3 minutes on an H200), so the timed runs after it start warm.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-runs/study-gpu}"
CPT="${CPT:-curriculum-pretrain}"
CORPORA=(python-packages python-docs)
declare -A LRS=([python-packages]=6e-4,1.2e-3,2.4e-3,4.8e-3,9.6e-3,1.92e-2  # up to 16x the best of the first study
                [python-docs]=1.5e-4,3e-4,6e-4,1.2e-3,2.4e-3,4.8e-3,9.6e-3)  # the first study's best was its lowest
mkdir -p "$OUT_DIR"

preparing=()
for corpus in "${CORPORA[@]}"; do  # both at once, on the CPU cores
    if [ ! -f "data/$corpus/manifest.json" ]; then
        $CPT prepare-data --source "$corpus" --vocab-size 16384 --val-fraction 0.02 \
            --num-proc $(($(nproc) / ${#CORPORA[@]})) > "$OUT_DIR/prepare-$corpus.log" 2>&1 &
        preparing+=($!)
    fi
done
for pid in "${preparing[@]}"; do
    wait "$pid" || { echo "prepare-data failed: see $OUT_DIR/prepare-*.log"; exit 1; }
done
for corpus in "${CORPORA[@]}"; do tail -n 4 "$OUT_DIR/prepare-$corpus.log" 2>/dev/null || true; done

study() {  # study CORPUS SETTING...: bench/study.sh for one corpus with these settings
    local corpus=$1
    shift
    env "$@" DROP_CHECKPOINTS=1 STUDY=bench/study-gpu OUT_DIR="$OUT_DIR/$corpus" DATA="data/$corpus" CPT="$CPT" \
        LRS="${LRS[$corpus]}" STABILITY_LRS=1 SEEDS=2 SEED_VARIANTS="baseline best" \
        bash bench/study.sh >> "$OUT_DIR/$corpus.log" 2>&1 || true
}

round() {  # round N CORPUS: the Nth of the study's steps for one corpus; status 1 past the last
    case $1 in
        0) $CPT train --config bench/study-gpu/length-warmup.yaml --set data.dir="data/$2" --stop-at-step 2 \
               --output-dir "$OUT_DIR/$2/prewarm" >> "$OUT_DIR/$2.log" 2>&1 || true ;;
        1) study "$2" STEPS=sweep ;;
        2) study "$2" STEPS=variants VARIANTS="length length-warmup batch-warmup baseline-stage-shape" ;;
        3) study "$2" STEPS=variants VARIANTS="pacing length-reshape" ;;
        4) study "$2" STEPS=seeds ;;
        5) study "$2" STEPS=stability STABILITY_VARIANTS="length-warmup length" ;;
        6) study "$2" STEPS=long ;;
        7) study "$2" STEPS=variants VARIANTS=length-seed-rule ;;
        8) study "$2" STEPS="lrfind compare" ;;
        *) return 1 ;;
    esac
}

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge ${#CORPORA[@]} ]; then
    for i in "${!CORPORA[@]}"; do
        (export CUDA_VISIBLE_DEVICES=$i; for ((n = 0; ; n++)); do round "$n" "${CORPORA[$i]}" || break; done) &
    done
    wait
else
    for ((n = 0; ; n++)); do for corpus in "${CORPORA[@]}"; do round "$n" "$corpus" || break 2; done; done
fi
