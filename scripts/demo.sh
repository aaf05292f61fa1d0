#!/usr/bin/env bash
# `make demo`: the whole pipeline on built-in synthetic data, on CPU (13 min measured on 2 idle cores).
#   1. generate synthetic fetal-echo videos and labelled stills
#   2. pretrain BarlowTwins on the videos
#   3. fine-tune random vs SSL initialisation at two label fractions, linear probe (cached features) and full,
#      3 seeds each
#   4. print the report table (mean ± std over seeds) and SSL - random with a paired bootstrap interval
set -euo pipefail
DEMO=${1:-.demo}
BIN=.venv/bin
DATA=$DEMO/data
RUNS=$DEMO/runs

[ -f "$DATA/labels.csv" ] || $BIN/fetalssl-demo-data "$DATA"

$BIN/fetalssl-train experiment=demo data.root="$DATA" paths.output_root="$RUNS" run_id=demo

$BIN/fetalssl-finetune -m experiment=demo_finetune data.root="$DATA" paths.output_root="$RUNS" run_id=demo \
  init=random,ssl_barlowtwins finetune_mode=linear_cached,full data_fraction=pct10,pct100 seed=0,1,2

$BIN/fetalssl-report "$RUNS/finetune_sweep/demo" --compare random ssl:barlowtwins
