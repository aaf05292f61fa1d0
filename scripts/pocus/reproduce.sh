#!/usr/bin/env bash
# Every step behind docs/results_pocus.md, in order: patient split + frames, SSL pretraining of three methods on
# the training patients' videos, the fine-tuning sweeps (fetalssl-finetune -m, resumable: a rerun skips the
# points already done) and the tables. About an hour on 2 idle CPU cores.
#   bash scripts/pocus/reproduce.sh OUT [POCUS_DIR]       (POCUS_DIR defaults to ../shared/data/pocus)
set -euo pipefail
OUT=${1:?usage: reproduce.sh OUT [POCUS_DIR]}
POCUS=${2:-../shared/data/pocus}
BIN=${BIN:-.venv/bin}
P=(paths.output_root="$OUT" paths.pocus="$POCUS")

"$BIN/fetalssl-extract-frames" "${P[@]}"
for method in barlowtwins simclr byol; do
  heads=()  # BarlowTwins' 8192-wide projector is too slow on a CPU; the other methods keep their own heads
  [ "$method" = barlowtwins ] && heads=('method.projector.hidden_dims=[1024,1024]' method.projector.out_dim=1024)
  "$BIN/fetalssl-train" experiment=pocus "${P[@]}" run_id=r0 method="$method" "${heads[@]}"
done

sweep() { "$BIN/fetalssl-finetune" -m experiment=pocus_finetune "${P[@]}" seed=0,1,2 \
            data_fraction=pct1,pct5,pct10,pct25,pct50,pct100 "$@"; }
SSL=(init=ssl init.ssl_dir="$OUT/pretrain" init.method=barlowtwins,simclr,byol)
LINEAR=(finetune_mode=linear finetune_mode.cache_features=true)
FOUR_CLASSES=(data.root="$OUT/pocus_prepared/labels.csv" 'data.classes=[regular,pneumonia,covid,viral]')
FULL=(finetune_mode=full trainer.max_epochs=6 trainer.check_val_every_n_epoch=3 data.batch_size=16)

# HOG ignores finetune_mode: its runs sit with the linear probes and are compared across modes below.
sweep run_id=3class/linear "${LINEAR[@]}" init=random,hog
sweep run_id=3class/linear "${LINEAR[@]}" "${SSL[@]}"
sweep run_id=3class/full "${FULL[@]}" init=random
sweep run_id=3class/full "${FULL[@]}" "${SSL[@]}"
sweep run_id=4class/linear "${LINEAR[@]}" "${FOUR_CLASSES[@]}" init=random,hog
sweep run_id=4class/linear "${LINEAR[@]}" "${FOUR_CLASSES[@]}" "${SSL[@]}"
sweep run_id=4class/full "${FULL[@]}" "${FOUR_CLASSES[@]}" init=random
sweep run_id=4class/full "${FULL[@]}" "${FOUR_CLASSES[@]}" "${SSL[@]}"

# Tables, and every SSL init against HOG and against random init with a paired patient-bootstrap interval.
for task in 3class 4class; do
  compare=()
  for method in barlowtwins simclr byol; do
    compare+=(--compare hog@linear "ssl:$method" --compare hog@linear "ssl:$method@full" --compare random "ssl:$method")
  done
  "$BIN/fetalssl-report" "$OUT/finetune_sweep/$task" --metric macro_f1 balanced_accuracy \
      test_video.macro_f1 test_video.balanced_accuracy "${compare[@]}"
done
