"""ONNX Runtime latency of two or more bundles of one catalogue, interleaved call by call, so a
noisy machine slows them alike (docs/BENCHMARKS.md): is this export faster than that one?

    python scripts/bench_bundles.py runs/bundles/a runs/bundles/b [--batches 1,8,64] [--k 10,100]
        [--threads 1] [--rounds 30]

Histories are the dataset's validation histories (from the first bundle's manifest), seen items
excluded, as the service calls it. Prints p50 per bundle and configuration and each bundle's
p50 ratio against the first; fails when the bundles' catalogues differ.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from service.bundle import Bundle
from training.data import leave_one_out, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", type=Path, nargs="+")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--k", default="10,100")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--rounds", type=int, default=30, help="Timed calls per bundle")
    args = parser.parse_args()
    if len(args.bundles) < 2:
        raise SystemExit("give at least two bundles")
    bundles = [Bundle(path, intra_op_threads=args.threads) for path in args.bundles]
    first = bundles[0]
    for b in bundles[1:]:
        if b.catalogue.item_ids != first.catalogue.item_ids:
            raise SystemExit(f"{b.path}: another catalogue than {first.path}")
    dataset = load_dataset(Path(first.manifest["dataset"]["path"]))
    histories = leave_one_out(dataset, first.max_history).valid.histories
    names = " | ".join(f"{b.path.name} p50 ms" for b in bundles)
    ratios = " | ".join(f"{b.path.name} / {first.path.name}" for b in bundles[1:])
    print(f"| batch | k | {names} | {ratios} |")
    print("|---|---|" + "---|" * (2 * len(bundles) - 1))
    for batch in (int(x) for x in args.batches.split(",")):
        h = histories[:batch]
        for k in (int(x) for x in args.k.split(",")):
            times: list[list[float]] = [[] for _ in bundles]
            for _ in range(3):  # warm-up
                for b in bundles:
                    b.recommend(h, k, h)
            for _ in range(args.rounds):
                for b, t in zip(bundles, times, strict=True):
                    start = time.perf_counter()
                    b.recommend(h, k, h)
                    t.append((time.perf_counter() - start) * 1000)
            p50 = [float(np.median(t)) for t in times]
            cells = " | ".join(f"{p:.2f}" for p in p50)
            rel = " | ".join(f"{p / p50[0]:.2f}" for p in p50[1:])
            print(f"| {batch} | {k} | {cells} | {rel} |", flush=True)


if __name__ == "__main__":
    main()
