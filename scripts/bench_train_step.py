"""Training-step time of a generative run's model with random batches against length-grouped
ones (`train.group_by_length`), the two kinds of step interleaved so that a noisy machine slows
them alike (docs/RESULTS.md).

    python scripts/bench_train_step.py --run runs/generative/quick/beauty/bbqrec/seed0
        [--steps 32] [--threads 1]

The model, its catalogue tables, the dataset and the batch size come from the run's checkpoint;
a step is the loss of `training.generative.Batch`, backward and an AdamW step, on batches of
`training.distributed.global_batches` (seed 0) as `bbqrec train` draws them. Prints the median
step time of each kind, the history columns a batch keeps on average, and the ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from training.data import history_lengths, leave_one_out, load_dataset, training_prefixes
from training.distributed import SINGLE, global_batches
from training.generative import Batch, load_generative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=32, help="Timed steps of each kind")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    model, tables, ckpt = load_generative(args.run)
    model.train()
    dataset = load_dataset(Path(ckpt["meta"]["dataset"]))
    split = leave_one_out(dataset, model.config.max_items)
    histories, targets = training_prefixes(split.train, model.config.max_items)
    lengths = history_lengths(histories)
    batch_size = int(ckpt["train_config"]["batch_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cpu = torch.device("cpu")
    kinds = {
        "random": global_batches(np.random.default_rng(0), len(targets), batch_size),
        "grouped": global_batches(np.random.default_rng(0), len(targets), batch_size, lengths),
    }
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    columns: dict[str, list[int]] = {kind: [] for kind in kinds}
    for _ in range(args.steps + 1):  # the first step of each kind is a warm-up
        for kind, batches in kinds.items():
            rows = next(batches, None)
            if rows is None:
                raise SystemExit(f"--steps exceeds the {len(targets) // batch_size} batches")
            batch = Batch.of(tables, histories, targets, rows, SINGLE.shard(rows), cpu)
            start = time.perf_counter()
            loss = batch.loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times[kind].append(time.perf_counter() - start)
            columns[kind].append(batch.sids.shape[1])
    share = float(lengths.mean()) / model.config.max_items
    print(
        f"{dataset.name}: {len(targets)} training prefixes, {share:.1%} of the "
        f"{model.config.max_items} history slots hold an item; batch {batch_size}, "
        f"{args.threads} thread(s), {args.steps} steps of each kind"
    )
    print("| batches | median ms a step | history columns kept (mean) |")
    print("|---|---|---|")
    medians = {kind: 1e3 * float(np.median(t[1:])) for kind, t in times.items()}
    for kind in kinds:
        print(f"| {kind} | {medians[kind]:.1f} | {np.mean(columns[kind][1:]):.1f} |")
    print(f"random / grouped: {medians['random'] / medians['grouped']:.2f}x")


if __name__ == "__main__":
    main()
