#!/usr/bin/env bash
# The generative comparison of docs/RESULTS.md: TIGER, BBQRec and its ablations, 3 seeds.
#   bash scripts/generative_results.sh PROFILE DATASET_NAME DATASET_DIR [RUNS=runs]
# e.g. bash scripts/generative_results.sh quick scientific_mm training/datasets/scientific_mm
# Needs runs/sasrec/NAME/seed0 (z_ID initialisation; trained on the training split only).
# TOK_EPOCHS (default 100) sets the tokenizer's epochs: 30 on Beauty/Sports (24-36 steps an epoch)
# gives about the step count of 100 on Scientific-mm (4 steps an epoch).
# MODELS and SEEDS (space-separated) pick a subset, e.g. MODELS="bbqrec tiger" SEEDS="0 1 2";
# an empty SEEDS ("SEEDS=") trains the tokenizers only.
# CONFIG (a JSON of 'model'/'train' overrides) and EPOCHS go to every `bbqrec train`; TAG names
# the run group instead of PROFILE (runs/generative/TAG/NAME/MODEL/seedS), e.g. the recipe of
# docs/RESULTS.md for training to convergence on CPUs:
#   echo '{"train": {"group_by_length": true, "lr_schedule": "cosine"}}' > runs/grouped-cosine.json
#   TAG=quick-grouped-cosine-e30 CONFIG=runs/grouped-cosine.json EPOCHS=30 bash scripts/generative_results.sh quick ...
# and with "patience": 15 in its "train" every run goes the 30 epochs (equal budgets; early
# stopping can end a cosine run before its rate decays: docs/METHOD.md, the schedule bullet).
# TIME_BUDGET (seconds) caps each run's training (`bbqrec train --time-budget`): the epoch that
# crosses it is validated and is the last. PARALLEL=1 trains every (model, seed) side by side, each
# logging to its run directory's train.log, so that small models share one GPU (not measured yet
# against one at a time; the tokenizers still train first, one by one), e.g. the full profile on
# a GPU, six runs for 6 minutes each:
#   TIME_BUDGET=360 PARALLEL=1 TAG=full-gpu MODELS="bbqrec tiger" bash scripts/generative_results.sh full ...
# Every stage resumes: rerunning after an interruption continues where it stopped.
set -euo pipefail
profile=$1 name=$2 dir=$3 runs=${4:-runs}
sasrec=$runs/sasrec/$name/seed0
tok_epochs=${TOK_EPOCHS:-100}
group=${TAG:-$profile}
train_args=()
[ -n "${CONFIG:-}" ] && train_args+=(--config "$CONFIG")
[ -n "${EPOCHS:-}" ] && train_args+=(--epochs "$EPOCHS")
[ -n "${TIME_BUDGET:-}" ] && train_args+=(--time-budget "$TIME_BUDGET")
# model -> "tokenizer-variant generative-variant"
declare -A models=(
  [tiger]="tiger plain"
  [bbqrec]="bbqrec bbqrec"
  [no-club]="no-club bbqrec"
  [no-shared-codebook]="separate-codebooks bbqrec"
  [no-zid]="no-id bbqrec"
  [no-reweight]="bbqrec no-reweight"
  [no-s2i]="bbqrec no-s2i"
)
selected=(${MODELS:-tiger bbqrec no-club no-shared-codebook no-zid no-reweight no-s2i})
for model in "${selected[@]}"; do
  read -r tok_variant _ <<< "${models[$model]}"
  tok=$runs/tok/$name/$tok_variant
  if [ ! -f "$tok/tokenizer.pt" ]; then
    bbqrec tokenize --dataset "$dir" --variant "$tok_variant" --sasrec "$sasrec" \
      --epochs "$tok_epochs" --out "$tok" --no-progress
  fi
done
seeds=${SEEDS-0 1 2}
[ -n "${seeds// /}" ] || exit 0
pids=()
for model in "${selected[@]}"; do
  read -r tok_variant gen_variant <<< "${models[$model]}"
  for seed in $seeds; do
    out=$runs/generative/$group/$name/$model/seed$seed
    [ -f "$out/results.json" ] && continue
    run=(bbqrec train --dataset "$dir" --tokenizer "$runs/tok/$name/$tok_variant"
      --profile "$profile" --variant "$gen_variant" --seed "$seed" --out "$out" --no-progress
      ${train_args[@]+"${train_args[@]}"})
    if [ "${PARALLEL:-0}" = 1 ]; then
      mkdir -p "$out"
      "${run[@]}" > "$out/train.log" 2>&1 &
      pids+=($!)
    else
      "${run[@]}"
    fi
  done
done
failed=0
for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || failed=1; done
[ "$failed" = 0 ] || { echo "a parallel run failed: see its train.log" >&2; exit 1; }
python scripts/summarize_runs.py "$runs"/generative/"$group"/"$name"/*/
