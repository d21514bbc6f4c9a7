#!/usr/bin/env bash
# The length-or-batch study of docs/RESULTS.md, with the project's own commands. By default the CPU study (the tiny
# Llama on the Python standard library, 819,200 tokens per run, configs in bench/study/); bench/study_gpu.sh runs
# the GPU study through the same steps with its own settings:
#   bash bench/study.sh      # CPU: about 70 minutes on 2 cores
# Settings (environment): STUDY (config directory, default bench/study), OUT_DIR (default runs/study), DATA (the
# data directory every run reads, default data/python-stdlib, prepared here if it is that one), LRS (the sweep's
# LRs), VARIANTS (those trained at the tuned LR), STABILITY_LRS (how many of the unstable LRs above the tuned one
# to test, lowest first; default all) and STABILITY_VARIANTS, SEEDS and SEED_VARIANTS (the extra seeds and the
# variants they run; `best` is the curriculum with the lowest final held-out loss so far), LONGER and LONG_VARIANTS
# (the longer runs' factor, default 4, and their variants, default "baseline best"), STEPS (which of the steps below
# to take, default all but long: sweep variants stability seeds lrfind compare), DROP_CHECKPOINTS=1 (remove each
# finished run's checkpoints: 1.5 GB a run at 124M).
# 1. sweep tunes the baseline's LR; the best is the lowest final held-out loss of a run that did not diverge.
# 2. every variant trains at that LR. 3. stability: the curricula at each LR above the tuned one where the
# baseline's sweep run was unstable (spikes, guard events) or diverged. 4. the extra seeds. 5. long: LONG_VARIANTS
# at the tuned LR with LONGER x the tokens, every stage's end and pacing's length scaled alike (so start-up and
# compilation weigh less in wall-clock time). 6. lr-find caps each length of length.yaml, which then trains at 4x
# the tuned LR under the caps. 7. compare, against the tuned baseline (and the longer runs against theirs).
# A run that finished (summary.json) is not run again, so the script can be taken up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY="${STUDY:-bench/study}"
OUT_DIR="${OUT_DIR:-runs/study}"
DATA="${DATA:-data/python-stdlib}"
LRS="${LRS:-1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2,6.4e-2}"
STABILITY_LRS="${STABILITY_LRS:-99}"
VARIANTS="${VARIANTS:-baseline-stage-shape length length-reshape length-seed-rule batch-warmup length-warmup pacing}"
STABILITY_VARIANTS="${STABILITY_VARIANTS:-length length-warmup pacing}"
SEEDS="${SEEDS:-2 3}"
SEED_VARIANTS="${SEED_VARIANTS:-baseline baseline-stage-shape length length-reshape length-warmup pacing batch-warmup}"
LONGER="${LONGER:-4}"
LONG_VARIANTS="${LONG_VARIANTS:-baseline best}"
STEPS="${STEPS:-sweep variants stability seeds lrfind compare}"
CPT="${CPT:-curriculum-pretrain}"
mkdir -p "$OUT_DIR"
if [ "$DATA" = data/python-stdlib ] && [ ! -f "$DATA/manifest.json" ]; then
    $CPT prepare-data --source python-stdlib --vocab-size 4096
fi

drop_checkpoints() {  # drop_checkpoints RUN_DIR...: with DROP_CHECKPOINTS=1, those of the finished runs
    local run
    if [ "${DROP_CHECKPOINTS:-0}" = 1 ]; then
        for run in "$@"; do [ ! -f "$run/summary.json" ] || rm -rf "$run/checkpoints"; done
    fi
}

train() {  # train RUN CONFIG [ARGS...]: one run into OUT_DIR/RUN, its output in OUT_DIR/RUN.log
    local run=$1 config=$2
    shift 2
    if [ -f "$OUT_DIR/$run/summary.json" ]; then return; fi
    echo "$(date +%T) $run: $config $*"
    $CPT train --config "$STUDY/$config.yaml" --set "data.dir=$DATA" "$@" --output-dir "$OUT_DIR/$run" \
        > "$OUT_DIR/$run.log" 2>&1 || true
    drop_checkpoints "$OUT_DIR/$run"
}

step() { [[ " $STEPS " == *" $1 "* ]]; }

# 1. the baseline's LR
! step sweep || [ -f "$OUT_DIR/baseline-sweep/lr_sweep_analysis.json" ] ||
    $CPT sweep --config "$STUDY/baseline.yaml" --set "data.dir=$DATA" --lrs "$LRS" \
        --output-dir "$OUT_DIR/baseline-sweep" > "$OUT_DIR/baseline-sweep.log" 2>&1 ||
        true  # a run the guard stopped (diverged) makes the sweep's status 1; its analysis is written all the same
drop_checkpoints "$OUT_DIR"/baseline-sweep/lr_*
best=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['best_lr'])" \
    "$OUT_DIR/baseline-sweep/lr_sweep_analysis.json")
echo "tuned baseline LR: $best"
baseline="$OUT_DIR/baseline-sweep/lr_$(python3 -c "print(f'{$best:.2e}')")"

# 2. every variant at the tuned LR
for variant in $VARIANTS; do
    ! step variants || train "$variant" "$variant" --set "curriculum.base_lr=$best"
done

# 3. stability: the curricula at the LRs above the tuned one where the baseline's sweep run was unstable or diverged
unstable=$(python3 -c "import json, sys; a = json.load(open(sys.argv[1])); print(' '.join([repr(r['lr']) for r in \
sorted(a['runs'], key=lambda r: r['lr']) if r['lr'] > a['best_lr'] and r['status'] in ('unstable', 'diverged')]\
[:int(sys.argv[2])]))" "$OUT_DIR/baseline-sweep/lr_sweep_analysis.json" "$STABILITY_LRS")
echo "the baseline was unstable or diverged at: $unstable"
stability=()
for lr in $unstable; do
    factor=$(python3 -c "print(f'{$lr / $best:g}x')")
    stability+=("$OUT_DIR/baseline-sweep/lr_$(python3 -c "print(f'{$lr:.2e}')")")
    for variant in $STABILITY_VARIANTS; do
        ! step stability || train "$variant-$factor" "$variant" --set "curriculum.base_lr=$lr"
        [ ! -d "$OUT_DIR/$variant-$factor" ] || stability+=("$OUT_DIR/$variant-$factor")
    done
done

# 4. the extra seeds
best_curriculum=$(python3 -c "import json, os, sys; losses = {v: json.load(open(f'{sys.argv[1]}/{v}/summary.json'))\
['final_eval_loss'] for v in ('length', 'length-reshape', 'length-warmup', 'pacing') \
if os.path.exists(f'{sys.argv[1]}/{v}/summary.json')}; print(min(losses, key=losses.get) if losses else 'length')" \
    "$OUT_DIR")
for seed in $SEEDS; do
    for variant in ${SEED_VARIANTS//best/$best_curriculum}; do
        ! step seeds || train "$variant-seed$seed" "$variant" --set "curriculum.base_lr=$best" --set "run.seed=$seed"
    done
done

# 5. the longer runs
if step long; then
    for variant in ${LONG_VARIANTS//best/$best_curriculum}; do
        longer=$(python3 bench/longer.py "$STUDY/$variant.yaml" "$LONGER")
        # shellcheck disable=SC2086  # $longer is several --set arguments
        train "long-$variant" "$variant" --set "curriculum.base_lr=$best" $longer
    done
fi

# 6. lr-find's caps, then 4x the tuned LR under them
if step lrfind; then
    [ -f "$OUT_DIR/length-lr-find/lr_caps.yaml" ] ||
        $CPT lr-find --config "$STUDY/length.yaml" --set "data.dir=$DATA" --steps 100 \
            --output-dir "$OUT_DIR/length-lr-find" > "$OUT_DIR/length-lr-find.log" 2>&1 || true
    [ ! -f "$OUT_DIR/length-lr-find/lr_caps.yaml" ] ||
        train length-4x-capped length --set "curriculum.base_lr=$(python3 -c "print(4 * $best)")" \
            --overlay "$OUT_DIR/length-lr-find/lr_caps.yaml"
fi

# 7. against the tuned baseline
step compare || exit 0
all=("$baseline")
for variant in baseline baseline-stage-shape length-reshape length batch-warmup length-warmup pacing; do
    [ $variant = baseline ] || [ ! -d "$OUT_DIR/$variant" ] || all+=("$OUT_DIR/$variant")
    for seed in $SEEDS; do
        [ ! -d "$OUT_DIR/$variant-seed$seed" ] || all+=("$OUT_DIR/$variant-seed$seed")
    done
done
for variant in length-seed-rule length-4x-capped; do [ ! -d "$OUT_DIR/$variant" ] || all+=("$OUT_DIR/$variant"); done
main=("$baseline")
for variant in baseline-stage-shape length-reshape length batch-warmup length-warmup pacing; do
    [ ! -d "$OUT_DIR/$variant" ] || main+=("$OUT_DIR/$variant")
done
$CPT compare "${all[@]}" --output-dir "$OUT_DIR/compare"
$CPT compare "${main[@]}" --output-dir "$OUT_DIR/compare-main"
[ ${#stability[@]} -eq 0 ] || $CPT compare "$baseline" "${stability[@]}" --output-dir "$OUT_DIR/compare-stability"
long=()
for variant in ${LONG_VARIANTS//best/$best_curriculum}; do
    [ ! -d "$OUT_DIR/long-$variant" ] || long+=("$OUT_DIR/long-$variant")
done
[ ${#long[@]} -lt 2 ] || $CPT compare "${long[@]}" --output-dir "$OUT_DIR/compare-long"
