"""Inference: numpy in, numpy out, over a loaded bundle; greedy micro-batching.

`MicroBatcher` runs one worker task: it takes whatever requests are queued (up to `max_batch`),
runs one ONNX Runtime call for all of them in a thread (so the event loop never blocks), and
answers each. There is no waiting window: a lone request runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def resolve_provider(requested: str) -> str:
    """'auto' -> cuda when ONNX Runtime offers it, else cpu."""
    if requested == "auto":
        return "cuda" if PROVIDERS["cuda"] in ort.get_available_providers() else "cpu"
    return requested


def session_providers(provider: str) -> list[str]:
    # CPU stays as the fallback ORT needs for unsupported nodes; readiness checks the first one.
    return [PROVIDERS["cuda"], PROVIDERS["cpu"]] if provider == "cuda" else [PROVIDERS["cpu"]]


@dataclass
class Query:
    history: np.ndarray  # (M,) item indices, oldest first (the model reads the last max_history)
    k: int
    exclude: np.ndarray  # (E,) item indices never to return (all seen items, or none)
    future: asyncio.Future[tuple[np.ndarray, np.ndarray]] = field(repr=False)
    enqueued: float = field(default_factory=time.perf_counter)


def run_queries(bundle: Bundle, queries: list[Query]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ONNX Runtime call for a batch of queries with possibly different k."""
    m = bundle.max_history
    histories = np.full((len(queries), m), -1, dtype=np.int64)
    for row, q in enumerate(queries):
        h = q.history[-m:]
        if len(h):
            histories[row, m - len(h) :] = h
    exclude = np.full((len(queries), max(1, *(len(q.exclude) for q in queries))), -1, np.int64)
    for row, q in enumerate(queries):
        exclude[row, : len(q.exclude)] = q.exclude
    k = max(q.k for q in queries)
    items, scores = bundle.recommend(histories, k, exclude)
    return [(items[row, : q.k], scores[row, : q.k]) for row, q in enumerate(queries)]


class MicroBatcher:
    def __init__(
        self,
        bundle: Callable[[], Bundle],
        *,
        max_batch: int,
        observe: Callable[[int, list[float], float], None] | None = None,
    ) -> None:
        """`bundle` returns the bundle to use (it may be swapped between batches); `observe`
        receives (batch size, queue waits in s, inference time in s) after each batch."""
        self._bundle, self.max_batch, self._observe = bundle, max_batch, observe
        self._queue: asyncio.Queue[Query] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="bbqrec-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def submit(
        self, history: np.ndarray, k: int, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        future: asyncio.Future[tuple[np.ndarray, np.ndarray]] = (
            asyncio.get_running_loop().create_future()
        )
        await self._queue.put(Query(history, k, exclude, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            start = time.perf_counter()
            waits = [start - q.enqueued for q in batch]
            try:
                results = await asyncio.to_thread(run_queries, self._bundle(), batch)
            except Exception as e:  # answer every waiter; the worker keeps serving
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(e)
                continue
            elapsed = time.perf_counter() - start
            for q, result in zip(batch, results, strict=True):
                if not q.future.done():
                    q.future.set_result(result)
            if self._observe is not None:
                self._observe(len(batch), waits, elapsed)
