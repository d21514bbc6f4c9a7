#!/usr/bin/env bash
# The GPU study of docs/RESULTS.md: GPT-2 124M (vocabulary 16,384) on two corpora prepared from the machine's own
# Python installation, 8,388,608 tokens per run, configs in bench/study-gpu/, each corpus through bench/study.sh:
#   bash bench/study_gpu.sh      # one GPU; OUT_DIR (default runs/study-gpu) gets runs/study-gpu/<corpus>/
# python-packages: the installed packages' .py files; python-docs: natural language, the docstrings, package
# descriptions and documentation files of the standard library and the packages (`prepare-data --help`).
# The two corpora take turns, in rounds of most to least needed (the sweeps, the length and batch variants, the
# other curricula, stability at the baseline's first unstable LR, a second seed of the baseline and of the best
# curriculum, the seed's LR rule, lr-find), so a run cut short by time still has both corpora's main comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-runs/study-gpu}"
CPT="${CPT:-curriculum-pretrain}"
CORPORA=(python-packages python-docs)
mkdir -p "$OUT_DIR"

preparing=()
for corpus in "${CORPORA[@]}"; do  # both at once, on the CPU cores
    if [ ! -f "data/$corpus/manifest.json" ]; then
        $CPT prepare-data --source "$corpus" --vocab-size 16384 --val-fraction 0.02 --num-proc 8 \
            > "$OUT_DIR/prepare-$corpus.log" 2>&1 &
        preparing+=($!)
    fi
done
for pid in "${preparing[@]}"; do
    wait "$pid" || { echo "prepare-data failed: see $OUT_DIR/prepare-*.log"; exit 1; }
done
for corpus in "${CORPORA[@]}"; do tail -n 4 "$OUT_DIR/prepare-$corpus.log" 2>/dev/null || true; done

round() {  # round SETTING...: bench/study.sh once per corpus with these settings
    local corpus
    for corpus in "${CORPORA[@]}"; do
        env "$@" DROP_CHECKPOINTS=1 STUDY=bench/study-gpu OUT_DIR="$OUT_DIR/$corpus" DATA="data/$corpus" CPT="$CPT" \
            LRS=6e-4,1.2e-3,2.4e-3,4.8e-3,9.6e-3,1.92e-2 STABILITY_LRS=1 SEEDS=2 \
            bash bench/study.sh >> "$OUT_DIR/$corpus.log" 2>&1 || true
    done
}
round STEPS=sweep
round STEPS=variants VARIANTS="length length-warmup batch-warmup baseline-stage-shape"
round STEPS=variants VARIANTS="pacing length-reshape"
round STEPS=stability STABILITY_VARIANTS="length-warmup length"
round STEPS=seeds SEED_VARIANTS="baseline best"
round STEPS=variants VARIANTS=length-seed-rule
round STEPS="lrfind compare"
