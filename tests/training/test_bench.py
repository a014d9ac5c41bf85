"""The GEMM accounting of `bbqrec bench-model` on hand-computed cases."""

from __future__ import annotations

import torch

from training.bench import Timing, gemm_gflop, gemm_peak


def test_gemm_gflop_counts_the_products_alone() -> None:
    linear = torch.nn.Linear(64, 256)  # (32, 64) x (64, 256): 2 * 32 * 64 * 256 FLOPs
    x, a, b = torch.randn(32, 64), torch.randn(3, 5, 7), torch.randn(3, 7, 11)

    def call() -> None:
        y = torch.relu(linear(x)).softmax(-1)  # the elementwise ops count nothing
        z = a @ b  # batched: 3 * 2 * 5 * 7 * 11
        del y, z

    assert gemm_gflop(call) * 1e9 == 2 * 32 * 64 * 256 + 3 * 2 * 5 * 7 * 11


def test_rates_divide_the_work_by_each_p50() -> None:
    t = Timing(batch=8, k=10, threads=1, eager_ms=(4.0, 9.0), ort_ms=(2.0, 3.0), gflop=0.5)
    assert t.rates() == (125.0, 250.0)  # 0.5 GFLOP in 4 ms and in 2 ms


def test_gemm_peak_is_a_positive_rate() -> None:
    assert gemm_peak(256, 64, 256, threads=1, repeats=3) > 0
