#!/usr/bin/env bash
# The GPU study of docs/RESULTS.md: GPT-2 124M (vocabulary 16,384) on two corpora prepared from the machine's own
# Python installation, 8,388,608 tokens per run, configs in bench/study-gpu/, each corpus through bench/study.sh:
#   bash bench/study_gpu.sh      # two GPUs: one corpus on each, side by side (one GPU: one after the other)
# python-packages: the installed packages' .py files; python-docs: natural language, the docstrings, package
# descriptions and documentation files of the standard library and the packages (`prepare-data --help`).
# OUT_DIR (default runs/study-gpu) gets runs/study-gpu/<corpus>/ and a log per corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-runs/study-gpu}"
CPT="${CPT:-curriculum-pretrain}"
CORPORA=(python-packages python-docs)
mkdir -p "$OUT_DIR"

for corpus in "${CORPORA[@]}"; do  # both at once, on the CPU cores
    [ -f "data/$corpus/manifest.json" ] ||
        $CPT prepare-data --source "$corpus" --vocab-size 16384 --val-fraction 0.02 --num-proc 16 \
            > "$OUT_DIR/prepare-$corpus.log" 2>&1 &
done
wait
for corpus in "${CORPORA[@]}"; do tail -n 4 "$OUT_DIR/prepare-$corpus.log" 2>/dev/null || true; done

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
study() {  # study CORPUS GPU
    CUDA_VISIBLE_DEVICES=$2 DROP_CHECKPOINTS=1 STUDY=bench/study-gpu OUT_DIR="$OUT_DIR/$1" DATA="data/$1" CPT="$CPT" \
        LRS=6e-4,1.2e-3,2.4e-3,4.8e-3,9.6e-3,1.92e-2 STABILITY_LRS=1 SEEDS=2 \
        SEED_VARIANTS="baseline length length-warmup" bash bench/study.sh > "$OUT_DIR/$1.log" 2>&1
}
if [ "$gpus" -ge 2 ]; then
    study "${CORPORA[0]}" 0 & study "${CORPORA[1]}" 1 & wait
else
    for corpus in "${CORPORA[@]}"; do study "$corpus" 0; done
fi
