"""`bbqrec bench-model`: latency of the whole recommendation (encoder + beam search) in PyTorch
eager and in ONNX Runtime, per batch size and k, measured in one run so the ratios compare like
with like. Histories are real validation histories of the run's dataset.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from model.generative import Trie, beam_search
from service.bundle import Bundle
from training.data import Dataset, leave_one_out, trim_padding
from training.generative import load_generative


@dataclass(frozen=True)
class Timing:
    batch: int
    k: int
    threads: int  # intra-op threads, for torch and ORT alike
    eager_ms: tuple[float, float]  # (p50, p99)
    ort_ms: tuple[float, float]


def measure(fn: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def bench(
    run: Path,
    bundle_dir: Path,
    dataset: Dataset,
    *,
    batches: list[int],
    ks: list[int],
    repeats: int,
    beam: int | None = None,
) -> list[Timing]:
    """`beam`: the beam width for both runtimes (default: the run's)."""
    model, tables, ckpt = load_generative(run)
    beam = int(ckpt["meta"]["beam"]) if beam is None else beam
    trie = Trie.from_sids(tables.sids, model.config.codebook_size).children
    histories = leave_one_out(dataset, model.config.max_items).valid.histories
    sessions = {t: Bundle(bundle_dir, intra_op_threads=t, beam=beam) for t in (1, 2)}
    results: list[Timing] = []
    for batch in batches:
        h = trim_padding(histories[:batch])  # what the service and evaluation feed both runtimes
        sids, codes = tables.gather(h)
        s_t, c_t, e_t = torch.from_numpy(sids), torch.from_numpy(codes), torch.from_numpy(h)
        for k in ks:
            for threads, bundle in sessions.items():
                torch.set_num_threads(threads)

                eager = partial(beam_search, model, s_t, c_t, trie, k=k, beam=beam, exclude=e_t)
                ort = partial(bundle.recommend, h, k, h)
                results.append(
                    Timing(batch, k, threads, measure(eager, repeats), measure(ort, repeats))
                )
    return results


def markdown(results: list[Timing]) -> str:
    lines = [
        "| batch | k | threads | eager p50 ms | eager p99 ms | ORT p50 ms | ORT p99 ms "
        "| speed-up (p50) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.batch} | {r.k} | {r.threads} | {r.eager_ms[0]:.2f} | {r.eager_ms[1]:.2f} "
            f"| {r.ort_ms[0]:.2f} | {r.ort_ms[1]:.2f} | {r.eager_ms[0] / r.ort_ms[0]:.2f}x |"
        )
    return "\n".join(lines)
