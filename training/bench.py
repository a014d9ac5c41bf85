"""`bbqrec bench-model`: latency of the whole recommendation (encoder + beam search) in PyTorch
eager and in ONNX Runtime, per batch size and k, measured in one run so the ratios compare like
with like. Histories are real validation histories of the run's dataset.

Each configuration also reports the GEMM work of one call (matrix-product FLOPs, counted on the
eager search by torch's FlopCounterMode; ONNX Runtime runs the same algorithm, so the same
products) and the rate each runtime reaches, next to the rate of one large matrix product of the
model's own shape (`gemm_peak`): how far either runtime is from being bound by its products.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

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
    gflop: float  # matrix-product GFLOP of one call (the eager search, counted)

    def rates(self) -> tuple[float, float]:
        """GFLOP/s of (eager, ORT) at their p50 latency."""
        return self.gflop / self.eager_ms[0] * 1e3, self.gflop / self.ort_ms[0] * 1e3


def measure(fn: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


@dataclass(frozen=True)
class BenchReport:
    timings: list[Timing]
    peak_shape: tuple[int, int, int]  # (rows, inner, cols) of the reference product
    peaks: dict[int, float]  # threads -> its GFLOP/s (`gemm_peak`)


def gemm_gflop(fn: Callable[[], object]) -> float:
    """Matrix-product GFLOP of one call of `fn` (torch ops only)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops()) / 1e9


def gemm_peak(rows: int, inner: int, cols: int, threads: int, repeats: int = 20) -> float:
    """GFLOP/s of one (rows, inner) x (inner, cols) float32 product in torch, p50 of `repeats`:
    the rate a runtime bound by the model's large products would reach on this machine."""
    torch.set_num_threads(threads)
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    p50_ms, _ = measure(lambda: a @ b, repeats)
    return 2 * rows * inner * cols / p50_ms / 1e6


def bench(
    run: Path,
    bundle_dir: Path,
    dataset: Dataset,
    *,
    batches: list[int],
    ks: list[int],
    repeats: int,
    beam: int | None = None,
) -> BenchReport:
    """`beam`: the beam width for both runtimes (default: the run's)."""
    model, tables, ckpt = load_generative(run)
    c = model.config
    # the feed-forward's first product over many beams: the model's largest GEMM shape
    shape = (8192, c.d_model, c.d_ff)
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
            eager = partial(beam_search, model, s_t, c_t, trie, k=k, beam=beam, exclude=e_t)
            gflop = gemm_gflop(eager)
            for threads, bundle in sessions.items():
                torch.set_num_threads(threads)
                ort = partial(bundle.recommend, h, k, h)
                results.append(
                    Timing(batch, k, threads, measure(eager, repeats), measure(ort, repeats), gflop)
                )
    return BenchReport(results, shape, {t: gemm_peak(*shape, threads=t) for t in sessions})


def markdown(report: BenchReport) -> str:
    rows, inner, cols = report.peak_shape
    peaks = ", ".join(f"{rate:.1f} GFLOP/s with {t}" for t, rate in report.peaks.items())
    lines = [
        f"GEMM peak, one ({rows}, {inner}) x ({inner}, {cols}) float32 product in torch: "
        f"{peaks} thread(s).",
        "",
        "| batch | k | threads | eager p50 ms | eager p99 ms | ORT p50 ms | ORT p99 ms "
        "| speed-up (p50) | GEMM GFLOP a call | eager GFLOP/s | ORT GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.timings:
        eager_rate, ort_rate = r.rates()
        lines.append(
            f"| {r.batch} | {r.k} | {r.threads} | {r.eager_ms[0]:.2f} | {r.eager_ms[1]:.2f} "
            f"| {r.ort_ms[0]:.2f} | {r.ort_ms[1]:.2f} | {r.eager_ms[0] / r.ort_ms[0]:.2f}x "
            f"| {r.gflop:.3f} | {eager_rate:.1f} | {ort_rate:.1f} |"
        )
    return "\n".join(lines)
