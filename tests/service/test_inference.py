"""The micro-batcher over a real bundle: answers equal a lone ONNX Runtime call, and with
`concurrency` > 1 a request does not wait for a batch already running."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.bundle import Bundle
from service.inference import MicroBatcher
from service.settings import Settings
from tests.training.test_export import assert_same_ranking
from training.data import left_pad

EMPTY = np.empty(0, dtype=np.int64)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def bundle(exported: tuple[Path, Path]) -> Bundle:
    return Bundle(exported[1])


def hold_first_call(bundle: Bundle) -> tuple[threading.Event, threading.Event]:
    """Make the bundle's first `recommend` call wait for `release`; `entered` is set when it
    has started. Later calls run at once."""
    entered, release = threading.Event(), threading.Event()
    run: Callable[..., tuple[np.ndarray, np.ndarray]] = bundle.recommend
    first = [True]

    def held(
        histories: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if first[0]:
            first[0] = False
            entered.set()
            release.wait(timeout=30)
        return run(histories, k, exclude)

    bundle.recommend = held  # type: ignore[method-assign]
    return entered, release


async def wait_for(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.001)


@pytest.mark.anyio
@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_request_waits_for_a_running_batch_only_without_a_free_worker(
    bundle: Bundle, concurrency: int
) -> None:
    entered, release = hold_first_call(bundle)
    batcher = MicroBatcher(max_batch=64, concurrency=concurrency)
    batcher.start()
    try:
        first = asyncio.create_task(batcher.submit(bundle, np.array([1, 2]), 5, EMPTY))
        await wait_for(entered)  # the first batch is running, held
        second = asyncio.create_task(batcher.submit(bundle, np.array([3]), 5, EMPTY))
        done, _ = await asyncio.wait({second}, timeout=0.5 if concurrency == 1 else 30)
        # one worker: the second request waits for the held batch; two: it runs beside it
        assert bool(done) == (concurrency > 1)
        assert not first.done()
        release.set()
        await asyncio.gather(first, second)
    finally:
        release.set()
        await batcher.stop()


@pytest.mark.anyio
async def test_concurrent_batches_answer_as_lone_calls(bundle: Bundle) -> None:
    """Many requests with different histories, k and exclusions through 3 concurrent workers:
    each answer is the one a lone call for that request gives."""
    rng = np.random.default_rng(0)
    n = len(bundle.catalogue.item_ids)
    requests = [
        (rng.integers(0, n, size=int(rng.integers(0, 25))), int(rng.integers(1, 30)))
        for _ in range(60)
    ]
    batcher = MicroBatcher(max_batch=8, concurrency=3)
    batcher.start()
    try:
        answers = await asyncio.gather(
            *(batcher.submit(bundle, h, k, h) for h, k in requests)  # seen items excluded
        )
    finally:
        await batcher.stop()
    for (history, k), (items, scores) in zip(requests, answers, strict=True):
        row = left_pad([history], bundle.max_history)
        exclude = left_pad([history], max(1, len(history)))
        want_items, want_scores = bundle.recommend(row, k, exclude)
        # a batch pads the exclusions to its longest row; the answer must not depend on it (nor
        # on the batch's shape, but for the order inside a near-tie)
        assert_same_ranking(items[None], scores[None], want_items)
        np.testing.assert_allclose(scores, want_scores[0], rtol=0, atol=1e-5)


def test_concurrency_is_validated(exported: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="concurrent_batches"):
        Settings(bundle_path=exported[1], concurrent_batches=0)
    with pytest.raises(ValueError, match="concurrency"):
        MicroBatcher(max_batch=8, concurrency=0)
