#!/usr/bin/env bash
# Issue 14's learning check on the demo data: each method added after the paper's seven, pretrained with
# experiment=demo (8 epochs, ResNet-18 at 64 px; MAE on ViT-S/16), then a linear probe on cached features at 10 %
# of the labels over 3 seeds against random init of the same backbone. Prints both reports with SSL - random and
# its paired bootstrap interval. About an hour on 2 idle CPU cores.
#   bash scripts/bench/new_methods_demo.sh OUT
set -euo pipefail
OUT=${1:?usage: new_methods_demo.sh OUT}
BIN=${BIN:-.venv/bin}
DATA=$OUT/data
RUNS=$OUT/runs
[ -f "$DATA/labels.csv" ] || "$BIN"/fetalssl-demo-data "$DATA"

common=(data.root="$DATA" paths.output_root="$RUNS" run_id=new_methods)
for method in simsiam nnclr mocov3 dino; do
  extra=()
  [ "$method" = dino ] && extra=(augment=multicrop)  # experiment=demo picks two-view ultrasound views
  [ -f "$RUNS/pretrain/$method/new_methods/backbone.pt" ] || \
    "$BIN"/fetalssl-train experiment=demo method=$method "${common[@]}" "${extra[@]}"
done
[ -f "$RUNS/pretrain/mae/new_methods/backbone.pt" ] || \
  "$BIN"/fetalssl-train experiment=demo method=mae backbone=vit_small "${common[@]}"

probe=(finetune_mode=linear_cached data_fraction=pct10 seed=0,1,2)
"$BIN"/fetalssl-finetune -m experiment=demo_finetune data.root="$DATA" paths.output_root="$RUNS" run_id=resnet \
  init=random,ssl_simsiam,ssl_nnclr,ssl_mocov3,ssl_dino "${probe[@]}"
"$BIN"/fetalssl-finetune -m experiment=demo_finetune data.root="$DATA" paths.output_root="$RUNS" run_id=vit \
  backbone=vit_small init=random,ssl_mae "${probe[@]}"

"$BIN"/fetalssl-report "$RUNS/finetune_sweep/resnet" --compare random ssl:simsiam --compare random ssl:nnclr \
  --compare random ssl:mocov3 --compare random ssl:dino
"$BIN"/fetalssl-report "$RUNS/finetune_sweep/vit" --compare random ssl:mae
