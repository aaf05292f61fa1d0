#!/usr/bin/env bash
# Issue 21's question on real data: for SSL pretraining, does the variety of the videos (more patients) matter
# more than their amount (more frames of each)? SimCLR on the POCUS lung videos of 25 / 50 / 100 % of the
# training patients at an equal number of distinct frames (EQUAL_FRAMES per video with all patients, x 2 and x 4
# with fewer; evenly spaced) and an equal number of training pairs (PAIRS per epoch, so every run costs the same),
# then a linear probe on cached features at 10 % and 100 % of the labels with 3 seeds, on one patient split.
# Results: README "Pretraining data budgets".
#   bash scripts/pocus/data_variance.sh OUT [POCUS_DIR]     (POCUS_DIR defaults to ../shared/data/pocus)
# Knobs (env): EPOCHS, EQUAL_FRAMES, PAIRS, SEEDS, FRACTIONS.
set -euo pipefail
OUT=${1:?usage: data_variance.sh OUT [POCUS_DIR]}
POCUS=${2:-../shared/data/pocus}
BIN=${BIN:-.venv/bin}
EPOCHS=${EPOCHS:-10}
EQUAL_FRAMES=${EQUAL_FRAMES:-8}
PAIRS=${PAIRS:-1024}
SEEDS=${SEEDS:-0,1,2}
FRACTIONS=${FRACTIONS:-pct10,pct100}
P=(paths.output_root="$OUT" paths.pocus="$POCUS")

"$BIN/fetalssl-extract-frames" "${P[@]}"
"$BIN/fetalssl-train" -m experiment=pocus "${P[@]}" method=simclr run_id=variance \
    data_budget=patients25,patients50,patients100 equal_budget_frames="$EQUAL_FRAMES" data.frame_selection=even \
    data.pairs_per_epoch="$PAIRS" trainer.max_epochs="$EPOCHS"
"$BIN/fetalssl-finetune" -m experiment=pocus_finetune "${P[@]}" run_id=variance \
    init.pretrain_sweep="$OUT/pretrain_sweep/variance" finetune_mode=linear finetune_mode.cache_features=true \
    data_fraction="$FRACTIONS" seed="$SEEDS"
"$BIN/fetalssl-report" "$OUT/finetune_sweep/variance" --metric macro_f1 test_video.macro_f1
