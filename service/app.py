"""The online service: `create_app(settings)`; the lifespan owns the bundle, the ONNX Runtime
sessions, the micro-batcher and the Redis pool, and hands them to routes as typed dependencies.
Nothing is built at import time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from service.bundle import Bundle
from service.inference import (
    PROVIDERS,
    MicroBatcher,
    resolve_provider,
    session_providers,
)
from service.metrics import Metrics
from service.settings import Settings
from service.store import EmbeddedRedis, HistoryStore, RedisHistoryStore

log = logging.getLogger("bbqrec.service")

ItemId = Annotated[str, Field(min_length=1, max_length=128)]
UserId = Annotated[str, Field(min_length=1, max_length=128)]


# -- API models ----------------------------------------------------------------------------------


class RecommendRequest(BaseModel):
    user_id: UserId
    k: int = Field(default=10, ge=1, le=100)
    exclude_seen: bool = True
    history: list[ItemId] | None = Field(
        default=None, description="Used as given instead of the stored history."
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    semantic_id: list[int]


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    model_version: str
    cold_start: bool = Field(description="No history: items ranked by training popularity.")
    history_length: int


class Event(BaseModel):
    user_id: UserId
    item_id: ItemId
    timestamp: float | None = None


class EventsRequest(BaseModel):
    events: list[Event] = Field(min_length=1, max_length=1000)


class EventsResponse(BaseModel):
    accepted: int


class NewItem(BaseModel):
    item_id: ItemId
    features: dict[str, list[float]] = Field(
        description="A precomputed vector per modality of the bundle (see GET /model)."
    )


class ItemResponse(BaseModel):
    item_id: str
    index: int
    semantic_id: list[int]
    added_at_serving_time: bool


class HistoryResponse(BaseModel):
    user_id: str
    items: list[str]


class Readiness(BaseModel):
    ready: bool
    bundle_loaded: bool
    provider_requested: str
    provider_actual: str
    redis: bool


# -- state owned by the lifespan ----------------------------------------------------------------


@dataclass
class Services:
    settings: Settings
    bundle: Bundle
    store: HistoryStore
    batcher: MicroBatcher
    metrics: Metrics
    provider: str  # resolved: cpu | cuda
    base_items: int  # catalogue size of the bundle (later items were added at serving time)
    warmed_up: bool = False
    items_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


Svc = Annotated[Services, Depends(services)]


def error(status: int, reason: str, **extra: Any) -> HTTPException:
    return HTTPException(status_code=status, detail={"reason": reason, **extra})


def require_key(svc: Svc, x_api_key: Annotated[str | None, Header()] = None) -> None:
    expected = svc.settings.api_key
    if expected is None:
        return
    if x_api_key is None or not hmac.compare_digest(
        x_api_key.encode(), expected.get_secret_value().encode()
    ):
        raise error(401, "missing or wrong X-API-Key")


def require_read_key(svc: Svc, x_api_key: Annotated[str | None, Header()] = None) -> None:
    if svc.settings.protect_reads:
        require_key(svc, x_api_key)


# -- app -------------------------------------------------------------------------------------


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    metrics = Metrics(registry or CollectorRegistry())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        provider = resolve_provider(settings.provider)
        bundle = Bundle(
            settings.bundle_path,
            providers=session_providers(provider),
            intra_op_threads=settings.intra_op_threads,
        )
        embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
        url = settings.redis_url or (embedded.url if embedded else "")
        store = RedisHistoryStore.from_url(
            url, capacity=settings.history_length, timeout_s=settings.redis_timeout_s
        )
        base_items = len(bundle.catalogue.item_ids)
        try:
            for item_id, record in sorted((await store.items()).items(), key=lambda x: x[1]["seq"]):
                if item_id not in bundle.catalogue.index:
                    bundle.catalogue = bundle.catalogue.with_item(
                        item_id, record["sid"], record["view_codes"]
                    )
        except (RedisError, OSError) as e:
            log.warning("could not restore items added at serving time: %s", e)
        batcher = MicroBatcher(
            lambda: bundle, max_batch=settings.max_batch, observe=metrics.observe_batch
        )
        batcher.start()
        svc = Services(settings, bundle, store, batcher, metrics, provider, base_items)
        app.state.services = svc
        # Warm-up: one real call per k bound, so the first user does not pay for it.
        for k in (1, 100):
            await batcher.submit(np.array([0], dtype=np.int64), k, np.array([0], dtype=np.int64))
        svc.warmed_up = True
        metrics.model_info.labels(version=bundle.version, provider=provider).set(1)
        log.info("serving %s on %s", bundle.version, bundle.recommender.get_providers()[0])
        try:
            yield
        finally:
            await batcher.stop()
            await store.close()
            if embedded is not None:
                embedded.close()

    app = FastAPI(
        title="BBQRec",
        description="Next-item recommendation with behaviour-bound semantic IDs.",
        version="0.1.0",
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse(
                status_code=413, content={"detail": {"reason": "request body too large"}}
            )
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")  # the template, never the raw path with ids
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.latency.labels(path, request.method).observe(time.perf_counter() - start)
        return response

    @app.post(
        "/recommend", response_model=RecommendResponse, dependencies=[Depends(require_read_key)]
    )
    async def recommend(body: RecommendRequest, svc: Svc) -> RecommendResponse:
        catalogue = svc.bundle.catalogue
        if body.history is not None:
            if len(body.history) > svc.bundle.max_history:
                raise error(422, f"history longer than the model's {svc.bundle.max_history} items")
            unknown = [i for i in body.history if i not in catalogue.index]
            if unknown:
                svc.metrics.unknown_items.labels("request").inc(len(unknown))
                raise error(422, "unknown item ids", unknown=unknown[:50])
            history = body.history
        else:
            start = time.perf_counter()
            try:
                stored = await svc.store.history(body.user_id)
            except (RedisError, OSError) as e:
                raise error(503, "history store unavailable") from e
            finally:
                svc.metrics.redis.labels("read").observe(time.perf_counter() - start)
            history = [i for i in stored if i in catalogue.index]
            if len(history) < len(stored):
                svc.metrics.unknown_items.labels("store").inc(len(stored) - len(history))
        indices = np.array([catalogue.index[i] for i in history], dtype=np.int64)
        if len(indices) == 0:
            svc.metrics.cold_start.inc()
            top = np.argsort(-catalogue.popularity, kind="stable")[: body.k]
            items = [
                RecommendedItem(
                    item_id=catalogue.item_ids[i],
                    score=float(catalogue.popularity[i]),
                    semantic_id=catalogue.sids[i].tolist(),
                )
                for i in top
            ]
            return RecommendResponse(
                items=items, model_version=svc.bundle.version, cold_start=True, history_length=0
            )
        exclude = indices if body.exclude_seen else np.empty(0, dtype=np.int64)
        found, scores = await svc.batcher.submit(indices, body.k, exclude)
        # The batch may have run on a newer snapshot (an item added meanwhile); snapshots only
        # grow, so the latest one maps every returned index.
        latest = svc.bundle.catalogue
        items = [
            RecommendedItem(
                item_id=latest.item_ids[i],
                score=float(s),
                semantic_id=latest.sids[i].tolist(),
            )
            for i, s in zip(found.tolist(), scores.tolist(), strict=True)
            if i >= 0
        ]
        return RecommendResponse(
            items=items,
            model_version=svc.bundle.version,
            cold_start=False,
            history_length=len(indices),
        )

    @app.post("/events", response_model=EventsResponse, dependencies=[Depends(require_key)])
    async def events(body: EventsRequest, svc: Svc) -> EventsResponse:
        unknown = sorted({e.item_id for e in body.events} - svc.bundle.catalogue.index.keys())
        if unknown:
            svc.metrics.unknown_items.labels("event").inc(len(unknown))
            raise error(422, "unknown item ids; nothing was written", unknown=unknown[:50])
        # Request order is time order, unless every event carries a timestamp.
        ordered = body.events
        if all(e.timestamp is not None for e in ordered):
            ordered = sorted(ordered, key=lambda e: e.timestamp or 0.0)
        start = time.perf_counter()
        try:
            await svc.store.append([(e.user_id, e.item_id) for e in ordered])
        except (RedisError, OSError) as e:
            raise error(503, "history store unavailable; nothing was written") from e
        finally:
            svc.metrics.redis.labels("write").observe(time.perf_counter() - start)
        return EventsResponse(accepted=len(ordered))

    @app.post(
        "/items", response_model=ItemResponse, status_code=201, dependencies=[Depends(require_key)]
    )
    async def add_item(body: NewItem, svc: Svc) -> ItemResponse:
        async with svc.items_lock:  # one writer at a time: each add builds on the last snapshot
            return await _add_item(body, svc)

    async def _add_item(body: NewItem, svc: Svc) -> ItemResponse:
        catalogue = svc.bundle.catalogue
        if body.item_id in catalogue.index:
            raise error(409, "item already exists")
        try:
            codes, view_codes = svc.bundle.quantize(
                {m: np.asarray(v, dtype=np.float32) for m, v in body.features.items()}
            )
            sid = np.array([*codes[0], catalogue.next_extra(codes[0])], dtype=np.int64)
        except ValueError as e:
            raise error(422, str(e)) from e
        record = {
            "sid": sid.tolist(),
            "view_codes": view_codes[0].tolist(),
            "seq": len(catalogue.item_ids),
        }
        try:
            await svc.store.save_item(body.item_id, record)
        except (RedisError, OSError) as e:
            raise error(503, "history store unavailable; the item was not added") from e
        svc.bundle.catalogue = catalogue.with_item(body.item_id, sid, view_codes[0])
        index = len(catalogue.item_ids)
        svc.metrics.items_added.inc()
        return ItemResponse(
            item_id=body.item_id, index=index, semantic_id=sid.tolist(), added_at_serving_time=True
        )

    @app.get(
        "/items/{item_id}", response_model=ItemResponse, dependencies=[Depends(require_read_key)]
    )
    async def get_item(item_id: str, svc: Svc) -> ItemResponse:
        catalogue = svc.bundle.catalogue
        if item_id not in catalogue.index:
            raise error(404, "unknown item id")
        i = catalogue.index[item_id]
        return ItemResponse(
            item_id=item_id,
            index=i,
            semantic_id=catalogue.sids[i].tolist(),
            added_at_serving_time=i >= svc.base_items,
        )

    @app.get(
        "/users/{user_id}/history",
        response_model=HistoryResponse,
        dependencies=[Depends(require_read_key)],
    )
    async def get_history(user_id: str, svc: Svc) -> HistoryResponse:
        try:
            items = await svc.store.history(user_id)
        except (RedisError, OSError) as e:
            raise error(503, "history store unavailable") from e
        return HistoryResponse(user_id=user_id, items=items)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness)
    async def readyz(svc: Svc, response: Response) -> Readiness:
        actual = svc.bundle.recommender.get_providers()[0]
        redis_ok = await svc.store.ping()
        ready = svc.warmed_up and actual == PROVIDERS[svc.provider] and redis_ok
        if not ready:
            response.status_code = 503
        return Readiness(
            ready=ready,
            bundle_loaded=svc.warmed_up,
            provider_requested=svc.provider,
            provider_actual=actual,
            redis=redis_ok,
        )

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/model")
    async def model_info(svc: Svc) -> dict[str, Any]:
        m = svc.bundle.manifest
        return {
            "model_version": svc.bundle.version,
            "provider": svc.provider,
            "items": len(svc.bundle.catalogue.item_ids),
            "max_history": svc.bundle.max_history,
            "max_k": m["max_k"],
            "modalities": m["modalities"],
        }

    return app
