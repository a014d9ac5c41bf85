"""Mean +- std over seeds of the `results.json` files under each run group directory.

python scripts/summarize_runs.py runs/sasrec/beauty runs/sasrec/sports ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

COLUMNS = ("recall@1", "recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20")


def main(groups: list[str]) -> None:
    print("| run | seeds | " + " | ".join(COLUMNS) + " | epochs (best) | train wall s |")
    print("|---|---|" + "---|" * len(COLUMNS) + "---|---|")
    for group in map(Path, groups):
        results = [json.loads(p.read_text()) for p in sorted(group.glob("*/results.json"))]
        if not results:
            continue
        cells = []
        for col in COLUMNS:
            values = np.array([r["test"][col] for r in results])
            cells.append(f"{values.mean():.4f} ± {values.std(ddof=0):.4f}")
        best = "/".join(str(r["best_epoch"]) for r in results)
        wall = np.mean([r["train_wall_seconds"] for r in results])
        print(
            f"| {group.name} | {len(results)} | " + " | ".join(cells) + f" | {best} | {wall:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
