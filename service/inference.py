"""Inference: numpy in, numpy out, over a loaded bundle; greedy micro-batching.

`MicroBatcher` runs `concurrency` worker tasks over one queue. An idle worker takes whatever
requests are queued (up to `max_batch`), runs one ONNX Runtime call for all of them in a thread
(so the event loop never blocks), and answers each. There is no waiting window: a lone request
runs at once. With more than one worker, a request that arrives while a batch is running starts
on the next idle worker instead of waiting for that batch to end (ONNX Runtime sessions take
concurrent `run` calls); each call uses `intra_op_threads` of its own, so `concurrency x
intra_op_threads` should not exceed the cores the process may use.

`ModelHolder` holds the bundle in service and swaps it whole (`POST /admin/reload`). A query
carries the bundle its item indices come from, so a batch queued before a swap still runs on the
old bundle and one queued after runs on the new one; the two are never mixed in one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    bundle: Bundle  # the bundle whose catalogue the indices below come from
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


def warm_up(bundle: Bundle) -> None:
    """One real call per k bound, so the first request does not pay for ORT's lazy set-up."""
    history = np.zeros((1, 1), dtype=np.int64)
    for k in (1, int(bundle.manifest["max_k"])):
        bundle.recommend(history, k, history)


class ModelHolder:
    """The bundle in service, replaced whole by `swap` (one reference assignment: a reader sees
    the old bundle or the new one, never a mix). `base_items` is the catalogue size the bundle
    was exported with; items past it were added at serving time."""

    def __init__(self, bundle: Bundle, *, base_items: int) -> None:
        self._current = (bundle, base_items)

    @property
    def bundle(self) -> Bundle:
        return self._current[0]

    @property
    def base_items(self) -> int:
        return self._current[1]

    def swap(self, bundle: Bundle, *, base_items: int) -> Bundle:
        """Serve `bundle` from now on; returns the bundle it replaces."""
        old = self._current[0]
        self._current = (bundle, base_items)
        return old


class MicroBatcher:
    def __init__(
        self,
        *,
        max_batch: int,
        concurrency: int = 1,
        observe: Callable[[int, list[float], float], None] | None = None,
    ) -> None:
        """`concurrency`: batches that may run at once (worker tasks, each calling ONNX Runtime
        in its own thread). `observe` receives (batch size, queue waits in s, inference time in
        s) after each batch."""
        if max_batch < 1 or concurrency < 1:
            raise ValueError(f"max_batch and concurrency must be >= 1: {max_batch}, {concurrency}")
        self.max_batch, self.concurrency, self._observe = max_batch, concurrency, observe
        self._queue: asyncio.Queue[Query] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        # Threads of their own: the loop's default executor also runs other blocking work.
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="bbqrec-ort")
        self._workers = [
            asyncio.create_task(self._run(self._executor), name=f"bbqrec-batcher-{i}")
            for i in range(self.concurrency)
        ]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
        if self._executor is not None:  # a call still running ends on its own
            self._executor.shutdown(wait=False)

    async def submit(
        self, bundle: Bundle, history: np.ndarray, k: int, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (item indices, scores) from `bundle` for one history of its item indices."""
        future: asyncio.Future[tuple[np.ndarray, np.ndarray]] = (
            asyncio.get_running_loop().create_future()
        )
        await self._queue.put(Query(bundle, history, k, exclude, future))
        return await future

    async def _run(self, executor: ThreadPoolExecutor) -> None:
        while True:
            taken = [await self._queue.get()]
            while len(taken) < self.max_batch and not self._queue.empty():
                taken.append(self._queue.get_nowait())
            # One call per bundle: only the batch taken during a swap holds two.
            by_bundle: dict[int, list[Query]] = {}
            for q in taken:
                by_bundle.setdefault(id(q.bundle), []).append(q)
            for batch in by_bundle.values():
                await self._run_batch(batch, executor)

    async def _run_batch(self, batch: list[Query], executor: ThreadPoolExecutor) -> None:
        start = time.perf_counter()
        waits = [start - q.enqueued for q in batch]
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                executor, run_queries, batch[0].bundle, batch
            )
        except Exception as e:  # answer every waiter; the worker keeps serving
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(e)
            return
        elapsed = time.perf_counter() - start
        for q, result in zip(batch, results, strict=True):
            if not q.future.done():
                q.future.set_result(result)
        if self._observe is not None:
            self._observe(len(batch), waits, elapsed)
