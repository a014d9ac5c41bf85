"""Rebuild the embedded default dataset (`training/datasets/scientific_mm/`) from `shared/data`.

Run once by a maintainer; the repo ships its output so nothing reads `shared/` at run time:

    python scripts/build_embedded_dataset.py ../shared/data/amazon_scientific
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "training" / "datasets" / "scientific_mm"


def main(src: Path) -> None:
    subset = src / "mm_subset"
    OUT.mkdir(parents=True, exist_ok=True)
    feature_ids = (subset / "feature_item_ids.txt").read_text().split()
    keep = set(feature_ids)
    with gzip.open(src / "items.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rows = [{"item_id": r["item_id"], "text": r["text"]} for r in rows if r["item_id"] in keep]
    # Order the catalogue like the feature rows so row r of every matrix is item r.
    order = {item: i for i, item in enumerate(feature_ids)}
    rows.sort(key=lambda r: order[r["item_id"]])
    assert [r["item_id"] for r in rows] == feature_ids
    with gzip.GzipFile(OUT / "items.jsonl.gz", "wb", mtime=0) as g:
        g.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    shutil.copyfile(subset / "sequences.jsonl.gz", OUT / "sequences.jsonl.gz")
    shutil.copyfile(subset / "feature_item_ids.txt", OUT / "feature_item_ids.txt")
    for name in ("clip_vitb32_image", "clip_vitb32_text"):
        np.save(OUT / f"{name}.npy", np.load(subset / f"{name}.npy").astype(np.float16))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
