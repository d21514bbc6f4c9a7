#!/usr/bin/env bash
# The CPU study of docs/RESULTS.md ("Length or batch: a first study on CPU"): the tiny Llama on the Python standard
# library, 819,200 tokens per run, held-out loss at the full length 256 every 40 steps. Configs in bench/study/.
#   bash bench/study_cpu.sh      # about 70 minutes on 2 CPU cores; OUT_DIR (default runs/study) gets every run
# 1. sweep tunes the baseline's LR (7 LRs, 2x apart); the best is the lowest final held-out loss of a run that did not
#    diverge. 2. every variant trains at that LR. 3. lr-find caps each length of length.yaml, which then trains at
#    4x the tuned LR under the caps. 4. stability: the curricula at each LR above the tuned one where the baseline's
#    sweep run was unstable (spikes, guard events) or diverged. 5. seeds 2 and 3 for the baseline, the controls and
#    the curricula. 6. compare, against the tuned baseline.
# A run that finished (summary.json) is not run again, so the script can be taken up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-runs/study}"
CPT="${CPT:-curriculum-pretrain}"
STUDY=bench/study
mkdir -p "$OUT_DIR"
[ -f data/python-stdlib/manifest.json ] || $CPT prepare-data --source python-stdlib --vocab-size 4096

train() {  # train RUN CONFIG [ARGS...]: one run into OUT_DIR/RUN, its output in OUT_DIR/RUN.log
    local run=$1 config=$2
    shift 2
    if [ -f "$OUT_DIR/$run/summary.json" ]; then return; fi
    echo "$(date +%T) $run: $config $*"
    $CPT train --config "$STUDY/$config.yaml" "$@" --output-dir "$OUT_DIR/$run" > "$OUT_DIR/$run.log" 2>&1 || true
}

# 1. the baseline's LR
[ -f "$OUT_DIR/baseline-sweep/lr_sweep_analysis.json" ] ||
    $CPT sweep --config "$STUDY/baseline.yaml" --lrs 1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2,6.4e-2 \
        --output-dir "$OUT_DIR/baseline-sweep" > "$OUT_DIR/baseline-sweep.log" 2>&1
best=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['best_lr'])" \
    "$OUT_DIR/baseline-sweep/lr_sweep_analysis.json")
echo "tuned baseline LR: $best"
baseline="$OUT_DIR/baseline-sweep/lr_$(python3 -c "print(f'{$best:.2e}')")"

# 2. every variant at the tuned LR
variants="baseline-stage-shape length length-reshape length-seed-rule batch-warmup length-warmup pacing"
for variant in $variants; do
    train "$variant" "$variant" --set "curriculum.base_lr=$best"
done

# 3. lr-find's caps, then 4x the tuned LR under them
[ -f "$OUT_DIR/length-lr-find/lr_caps.yaml" ] ||
    $CPT lr-find --config "$STUDY/length.yaml" --steps 100 --output-dir "$OUT_DIR/length-lr-find" \
        > "$OUT_DIR/length-lr-find.log" 2>&1
train length-4x-capped length --set "curriculum.base_lr=$(python3 -c "print(4 * $best)")" \
    --overlay "$OUT_DIR/length-lr-find/lr_caps.yaml"

# 4. stability: the curricula at each LR above the tuned one where the baseline's sweep run was unstable or diverged
unstable=$(python3 -c "import json, sys; a = json.load(open(sys.argv[1])); print(' '.join(repr(r['lr']) for r in \
a['runs'] if r['lr'] > a['best_lr'] and r['status'] in ('unstable', 'diverged')))" \
    "$OUT_DIR/baseline-sweep/lr_sweep_analysis.json")
echo "the baseline was unstable or diverged at: $unstable"
stability=()
for lr in $unstable; do
    factor=$(python3 -c "print(f'{$lr / $best:g}x')")
    stability+=("$OUT_DIR/baseline-sweep/lr_$(python3 -c "print(f'{$lr:.2e}')")")
    for variant in length length-warmup pacing; do
        train "$variant-$factor" "$variant" --set "curriculum.base_lr=$lr"
        stability+=("$OUT_DIR/$variant-$factor")
    done
done

# 5. seeds 2 and 3
for seed in 2 3; do
    for variant in baseline baseline-stage-shape length length-reshape length-warmup pacing batch-warmup; do
        train "$variant-seed$seed" "$variant" --set "curriculum.base_lr=$best" --set "run.seed=$seed"
    done
done

# 6. against the tuned baseline
all=("$baseline")
for variant in baseline baseline-stage-shape length-reshape length batch-warmup length-warmup pacing; do
    [ $variant = baseline ] || all+=("$OUT_DIR/$variant")
    all+=("$OUT_DIR/$variant-seed2" "$OUT_DIR/$variant-seed3")
done
$CPT compare "${all[@]}" "$OUT_DIR"/{length-seed-rule,length-4x-capped} --output-dir "$OUT_DIR/compare"
$CPT compare "$baseline" "$OUT_DIR"/{baseline-stage-shape,length-reshape,length,batch-warmup,length-warmup,pacing} \
    --output-dir "$OUT_DIR/compare-main"
[ ${#stability[@]} -eq 0 ] || $CPT compare "$baseline" "${stability[@]}" --output-dir "$OUT_DIR/compare-stability"
