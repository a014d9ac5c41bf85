#!/usr/bin/env bash
# The main job: on the embedded Scientific-mm dataset, train SASRec (behaviour embeddings),
# the BBQRec tokenizer and the generative model (quick profile) unless a bundle exists, export
# the bundle, and serve it with an embedded Redis. Prints a working curl.
set -euo pipefail
runs=${RUNS:-runs/demo}
bundle=${BUNDLE:-$runs/bundle}
port=${PORT:-8000}
if [ ! -f "$bundle/manifest.json" ]; then
  bbqrec data stats
  bbqrec train-sasrec --out "$runs/sasrec" --config training/configs/sasrec.json
  bbqrec tokenize --out "$runs/tok" --sasrec "$runs/sasrec"
  bbqrec train --out "$runs/gen" --tokenizer "$runs/tok" --profile quick
  bbqrec export --run "$runs/gen" --out "$bundle"
fi
user=$(python -c "import gzip,json;print(json.loads(gzip.open('training/datasets/scientific_mm/sequences.jsonl.gz','rt').readline())['user_id'])")
item=$(head -1 training/datasets/scientific_mm/feature_item_ids.txt)
cat <<MSG

Serving $bundle on http://127.0.0.1:$port (embedded Redis under ${BBQREC_DATA_DIR:-data}/).
Try, from another shell:
  curl -s -X POST localhost:$port/events -H 'content-type: application/json' \\
       -d '{"events": [{"user_id": "$user", "item_id": "$item"}]}'
  curl -s -X POST localhost:$port/recommend -H 'content-type: application/json' \\
       -d '{"user_id": "$user", "k": 10}'
MSG
exec bbqrec serve --bundle "$bundle" --port "$port"
