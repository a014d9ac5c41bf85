#!/usr/bin/env bash
# SASRec baselines for docs/RESULTS.md: 3 seeds on the embedded Scientific-mm, Beauty and Sports.
#   bash scripts/sasrec_baselines.sh [DATA_ROOT=../shared/data] [RUNS=runs/sasrec]
set -euo pipefail
data=${1:-../shared/data}
runs=${2:-runs/sasrec}
declare -A dirs=([scientific_mm]=training/datasets/scientific_mm [beauty]=$data/amazon_beauty [sports]=$data/amazon_sports)
for name in scientific_mm beauty sports; do
  for seed in 0 1 2; do
    out=$runs/$name/seed$seed
    [ -f "$out/results.json" ] && continue
    bbqrec train-sasrec --dataset "${dirs[$name]}" --config training/configs/sasrec.json \
      --seed "$seed" --out "$out" --no-progress
  done
done
python scripts/summarize_runs.py "$runs"/*/
