#!/usr/bin/env bash
# Issue 15's question on real data: does handling the scan layout (crop to the sector, zero outside it, inpaint
# burned-in overlays) help, and does SSL beat HOG at 10 % of the labels? Patient-grouped, label-stratified
# 5-fold cross-validation of the POCUS lung videos (3 classes), every fold with its own SSL pretraining on its
# training patients only, both scan settings, data-derived normalisation in both (so only the scan handling
# differs). Sized for about an hour on 2 idle CPU cores: one SSL method (SimCLR, 5 epochs), linear probe on
# cached features, 1/10/100 % of the labels, one seed per fold (the folds give the spread). Results:
# docs/results_pocus.md ("Cross-validated").
#   bash scripts/pocus/cross_validate.sh OUT [POCUS_DIR]     (POCUS_DIR defaults to ../shared/data/pocus)
# Knobs for a quicker look (env): FOLDS, EPOCHS, SEEDS, FRACTIONS, SCANS.
set -euo pipefail
OUT=${1:?usage: cross_validate.sh OUT [POCUS_DIR]}
POCUS=${2:-../shared/data/pocus}
BIN=${BIN:-.venv/bin}
FOLDS=${FOLDS:-5}
EPOCHS=${EPOCHS:-5}
SEEDS=${SEEDS:-0}
FRACTIONS=${FRACTIONS:-pct1,pct10,pct100}
SCANS=${SCANS:-keep sector}
METHOD=simclr
P=(paths.output_root="$OUT" paths.pocus="$POCUS")
PREPARED="$OUT/pocus_prepared"

"$BIN/fetalssl-extract-frames" "${P[@]}" folds="$FOLDS"
# What the model sees with the sector handling: contact sheets and a summary of every video.
"$BIN/fetalssl-prepare" paths=pocus "${P[@]}" data.root=null data.manifest="$PREPARED/videos.csv" data.short_side=80 data.stride=2 \
    scan=sector report.dir="$OUT/prepare_report" data.cache_dir="$OUT/pocus_frame_cache"

for ((fold = 0; fold < FOLDS; fold++)); do
  for scan in $SCANS; do
    run="cv-fold$fold-$scan"
    "$BIN/fetalssl-train" experiment=pocus "${P[@]}" method=$METHOD run_id="$run" scan="$scan" \
        normalization=measured data.manifest="$PREPARED/pretrain_manifest_fold$fold.csv" trainer.max_epochs="$EPOCHS"
    ssl=(init=ssl init.checkpoint="$OUT/pretrain/$METHOD/$run/backbone.pt")
    for init in baselines ssl; do
      inits=(init=random,hog)
      [ "$init" = ssl ] && inits=("${ssl[@]}")
      "$BIN/fetalssl-finetune" -m experiment=pocus_finetune "${P[@]}" run_id="cv/$scan/fold$fold" \
          data.folds="$FOLDS" data.fold="$fold" scan="$scan" normalization=measured seed="$SEEDS" \
          data_fraction="$FRACTIONS" finetune_mode=linear finetune_mode.cache_features=true "${inits[@]}"
    done
  done
done

# Tables over folds, and the paired bootstrap pooled over folds: SSL against HOG and random init, and each init
# with the sector handling against itself without.
KEEP=keep
SECTOR=crop+zero_outside+inpaint_overlays+skip_doppler+skip_split
compare=()
for scan in $KEEP $SECTOR; do
  compare+=(--compare "hog (scan=$scan)" "ssl:$METHOD (scan=$scan)" --compare "random (scan=$scan)" "ssl:$METHOD (scan=$scan)")
done
for init in hog random "ssl:$METHOD"; do
  compare+=(--compare "$init (scan=$KEEP)" "$init (scan=$SECTOR)")
done
"$BIN/fetalssl-report" "$OUT/finetune_sweep/cv" --metric macro_f1 balanced_accuracy test_video.macro_f1 \
    test_video.balanced_accuracy "${compare[@]}"
