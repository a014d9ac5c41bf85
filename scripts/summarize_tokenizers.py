"""One markdown row per tokenizer artifact: codebook statistics from its metrics.json/run.json.

python scripts/summarize_tokenizers.py runs/tok/*/*/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    print(
        "| artifact | variant | modalities | utilisation per level | perplexity per level "
        "| collisions before extra level | after | max extra index | reconstruction error "
        "| epochs | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in map(Path, dirs):
        if not (d / "metrics.json").exists():
            continue
        m = json.loads((d / "metrics.json").read_text())
        run = json.loads((d / "run.json").read_text())
        util = " / ".join(f"{lv['utilisation']:.2f}" for lv in m["levels"])
        ppl = " / ".join(f"{lv['perplexity']:.0f}" for lv in m["levels"])
        recon = ", ".join(f"{k} {v:.3f}" for k, v in m["reconstruction_error"].items())
        mods = "+".join(
            run["config"]["tokenizer"]["modalities"][i][0]
            for i in range(len(run["config"]["tokenizer"]["modalities"]))
        )
        print(
            f"| {d.parent.name}/{d.name} | {run['variant']} | {mods} | {util} | {ppl} "
            f"| {m['collision_rate_before_extra_level']:.2%} "
            f"| {m['collision_rate_after_extra_level']:.2%} | {m['max_extra_level']} "
            f"| {recon} | {len(m['curves'])} | {run['wall_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
