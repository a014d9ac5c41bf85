"""The online service: `create_app(settings)`; the lifespan owns the bundle, the ONNX Runtime
sessions, the micro-batcher and the Redis pool, and hands them to routes as typed dependencies.
Nothing is built at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Set
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.bundle import Bundle, item_source
from service.inference import (
    PROVIDERS,
    MicroBatcher,
    ModelHolder,
    resolve_provider,
    session_providers,
    warm_up,
)
from service.metrics import Metrics
from service.settings import Settings
from service.store import (
    EmbeddedRedis,
    HistoryStore,
    IdempotencyConflictError,
    ItemExistsError,
    RedisHistoryStore,
    StoreUnavailableError,
)

log = logging.getLogger("bbqrec.service")

ItemId = Annotated[str, Field(min_length=1, max_length=128)]
UserId = Annotated[str, Field(min_length=1, max_length=128)]
PathId = Annotated[str, PathParam(max_length=128)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
MODEL_VERSION_HEADER = "X-Model-Version"
DEGRADED_HEADER = "X-BBQRec-Degraded"  # set when an answer was made without Redis
RETRY_AFTER_S = 1
RESTORE_TIMEOUT_S = 30.0  # Redis budget for reading the items added at serving time, at start-up
MAX_MISSING_ITEMS = 100_000  # bound on the ids remembered as found nowhere between two syncs


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
    timestamp: Finite | None = None


class EventsRequest(BaseModel):
    events: list[Event] = Field(min_length=1, max_length=1000)


class EventsResponse(BaseModel):
    accepted: int
    replayed: bool = Field(
        default=False,
        description="True when an earlier request with this Idempotency-Key wrote these events: "
        "nothing was written again.",
    )


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes a retry safe: the events of a request are written once per key "
        "(for BBQREC_IDEMPOTENCY_TTL_S); the same key with other events is refused (422).",
    ),
]


class NewItem(BaseModel):
    item_id: ItemId
    features: dict[str, list[Finite]] = Field(
        default_factory=dict,
        description="A precomputed vector per modality of the bundle (see GET /model).",
    )
    text: str | None = Field(
        default=None,
        min_length=1,
        max_length=20_000,
        description="Raw item text for the bundle's text modality, embedded with the training "
        "text encoder (bundles whose `text_encoder` is set, see GET /model); instead of "
        "`features.text`.",
    )


class ItemResponse(BaseModel):
    item_id: str
    index: int
    semantic_id: list[int]
    added_at_serving_time: bool


class HistoryResponse(BaseModel):
    user_id: str
    items: list[str]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `unknown` (ids) or `errors` (validation)
    reason: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx this service answers itself: `{"detail": {"reason": ..., ...}}`."""

    detail: ErrorDetail


class ReloadRequest(BaseModel):
    bundle_path: str | None = Field(
        default=None,
        max_length=4096,
        description="Bundle directory to load; unset = re-read the configured one.",
    )


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str
    items: int
    load_seconds: float


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
    model: ModelHolder  # the bundle in service; POST /admin/reload swaps it
    store: HistoryStore
    batcher: MicroBatcher
    metrics: Metrics
    provider: str  # resolved: cpu | cuda
    warmed_up: bool = False
    items_cursor: int = 0  # entries of the shared added-items log taken into the bundle
    # Ids of stored histories found nowhere (e.g. dropped by a new bundle) since the last item
    # sync: not looked up again until the sync, which takes in any of them added meanwhile.
    missing_items: set[str] = field(default_factory=set)
    items_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def bundle(self) -> Bundle:
        """The bundle in service now. A route that maps item ids to indices and back reads it
        once (a reload may swap it meanwhile)."""
        return self.model.bundle


# Dependencies are `async def`: FastAPI runs a plain `def` dependency in a worker thread, a
# thread hop per request for work that never blocks.


async def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


Svc = Annotated[Services, Depends(services)]


def error(status: int, reason: str, **extra: Any) -> HTTPException:
    return HTTPException(status_code=status, detail={"reason": reason, **extra})


def unavailable(reason: str, **extra: Any) -> HTTPException:
    """503 with Retry-After: Redis failed or ran past its budget; the client may retry."""
    return HTTPException(
        status_code=503,
        detail={"reason": reason, **extra},
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


ApiKey = Annotated[str | None, Depends(APIKeyHeader(name="X-API-Key", auto_error=False))]


def check_key(svc: Services, x_api_key: str | None) -> None:
    expected = svc.settings.api_key
    if expected is None:
        return
    # Constant time: the comparison takes as long however much of a wrong key matches.
    if x_api_key is None or not hmac.compare_digest(
        x_api_key.encode(), expected.get_secret_value().encode()
    ):
        raise error(401, "missing or wrong X-API-Key")


async def require_key(svc: Svc, x_api_key: ApiKey) -> None:
    check_key(svc, x_api_key)


async def require_read_key(svc: Svc, x_api_key: ApiKey) -> None:
    if svc.settings.protect_reads:
        check_key(svc, x_api_key)


async def require_admin(svc: Svc, x_api_key: ApiKey) -> None:
    """Admin routes are off unless an API key is configured, and then need it."""
    if svc.settings.api_key is None:
        raise error(403, "admin routes are disabled: no API key is configured")
    check_key(svc, x_api_key)


ERRORS = {
    401: "Missing or wrong X-API-Key.",
    403: "Admin routes are disabled (no API key configured).",
    404: "Unknown id.",
    409: "Already exists (an item), or not possible in this deployment (a reload with several "
    "workers).",
    413: "Request body larger than the configured limit.",
    422: "Invalid request: the reason says what, nothing was written.",
    503: "History store unavailable (see Retry-After); the write was not acknowledged.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route can give (all of shape ErrorResponse)."""
    return {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in codes}


class Observe:
    """Counts and times every request by route template, method and status. Plain ASGI (not
    `@app.middleware`, whose per-request task and stream wrapping halved the throughput)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless the app starts a response

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            # the router writes the matched route into the scope: the template, never the raw
            # path with ids
            path = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path, method).observe(time.perf_counter() - start)


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413, before any route reads it: by the
    declared Content-Length, or by counting a body sent without one (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = f"request body larger than {self.max_bytes} bytes"
        response = JSONResponse(status_code=413, content={"detail": {"reason": reason}})
        await response(scope, receive, send)


# -- app -------------------------------------------------------------------------------------


def restore_budget(settings: Settings) -> float:
    """Redis budget for reading the items added at serving time (at start-up, many at once)."""
    return max(settings.redis_timeout_s, RESTORE_TIMEOUT_S)


async def adopt_items(
    store: HistoryStore, metrics: Metrics, bundle: Bundle, records: dict[str, dict[str, Any]]
) -> int:
    """Take items added at serving time (records from the store, by any replica, with their
    codes in this bundle's SID space) into the bundle's catalogue, in the order they were
    added; returns how many joined it. An item added under a bundle of another tokenizer has no
    codes in this space yet: it is quantized again from what it was added from and claims a
    SID here (once, across replicas); one this bundle cannot quantize stays out, counted.
    Callers hold the items lock (one writer per catalogue), or own the bundle alone."""
    new = sorted(
        (
            (i, r)
            for i, r in records.items()
            if i not in bundle.catalogue.index and i not in bundle.unplaced
        ),
        key=lambda item: int(item[1]["seq"]),
    )
    codes = {i: r["codes"] for i, r in new if r["codes"] is not None}
    if homeless := [(i, r) for i, r in new if r["codes"] is None]:
        quantized = await asyncio.to_thread(
            bundle.quantize_sources, [r.get("source", {}) for _, r in homeless]
        )
        for (item_id, _), q in zip(homeless, quantized, strict=True):
            try:
                if q is None:
                    raise ValueError("cannot quantize what it was added from")
                prefix, view_codes = q
                codes[item_id] = await store.claim_sid(
                    item_id,
                    bundle.sid_space,
                    prefix.tolist(),
                    bundle.catalogue.taken_extras(prefix),
                    bundle.catalogue.codebook_size,
                    view_codes.tolist(),
                )
                metrics.items_requantized.inc()
            except (ValueError, KeyError) as e:
                bundle.unplaced.add(item_id)
                metrics.items_unplaced.inc()
                log.warning("item %r left out of %s: %s", item_id, bundle.version, e)
    joined = [
        (i, np.asarray(codes[i]["sid"]), np.asarray(codes[i]["view_codes"]))
        for i, _ in new
        if i in codes
    ]
    bundle.catalogue = bundle.catalogue.with_items(joined)
    return len(joined)


async def load_model(
    path: Path, settings: Settings, provider: str, store: HistoryStore, metrics: Metrics
) -> tuple[Bundle, int, int]:
    """Load and verify a bundle (in a thread), re-add the items added at serving time (kept in
    Redis; quantized again when they were added under another tokenizer), and warm it up.
    Returns the bundle, its exported catalogue size and the position in the added-items log it
    has taken in (0 when Redis could not be read: the sync catches up)."""
    bundle = await asyncio.to_thread(
        Bundle,
        path,
        providers=session_providers(provider),
        intra_op_threads=settings.intra_op_threads,
        beam=settings.beam,
    )
    base_items = len(bundle.catalogue.item_ids)
    cursor = 0
    try:
        cursor, records = await store.items_since(
            0, bundle.sid_space, timeout_s=restore_budget(settings)
        )
        await adopt_items(store, metrics, bundle, records)
    except (RedisError, OSError) as e:
        cursor = 0
        log.warning("could not restore items added at serving time: %s", e)
    await asyncio.to_thread(warm_up, bundle)
    return bundle, base_items, cursor


async def sync_items(svc: Services) -> int:
    """Take in the items other replicas added since the last sync; returns how many."""
    budget = restore_budget(svc.settings)
    async with svc.items_lock:
        bundle = svc.bundle
        cursor, records = await svc.store.items_since(
            svc.items_cursor, bundle.sid_space, timeout_s=budget
        )
        added = await adopt_items(svc.store, svc.metrics, bundle, records)
        svc.items_cursor = max(svc.items_cursor, cursor)
        svc.missing_items.clear()
    svc.metrics.items_synced.inc(added)
    return added


async def keep_items_in_sync(svc: Services) -> None:
    """Every `items_sync_s`: items added on other replicas become recommendable here too."""
    while True:
        await asyncio.sleep(svc.settings.items_sync_s)
        try:
            await sync_items(svc)
        except (RedisError, OSError) as e:  # readiness reports Redis; try again next time
            log.debug("item sync skipped: %s", e)
        except Exception:  # never let the loop die quietly
            log.exception("item sync failed")


async def resolve_items(
    svc: Services, bundle: Bundle, item_ids: list[str], *, skip: Set[str] = frozenset()
) -> list[str]:
    """Those of `item_ids` unknown to `bundle`, after looking them up among the items other
    replicas added (found ones join the catalogue at once, without waiting for the sync); ids
    in `skip` are not looked up (nor returned), nor are the ones the bundle could not take in
    (returned). Raises StoreUnavailableError when Redis cannot answer."""
    index = bundle.catalogue.index
    unknown = sorted({i for i in item_ids if i not in index and i not in skip})
    if lookup := [i for i in unknown if i not in bundle.unplaced]:
        found = await svc.store.items_by_id(lookup, bundle.sid_space)
        if found:
            async with svc.items_lock:
                added = await adopt_items(svc.store, svc.metrics, bundle, found)
                current = svc.bundle
                if current is not bundle:  # swapped meanwhile: the new bundle needs them too
                    if current.sid_space != bundle.sid_space:
                        found = await svc.store.items_by_id(list(found), current.sid_space)
                    await adopt_items(svc.store, svc.metrics, current, found)
            svc.metrics.items_synced.inc(added)
    return [i for i in unknown if i not in bundle.catalogue.index]


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    metrics = Metrics(registry or CollectorRegistry())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        provider = resolve_provider(settings.provider)
        embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
        url = settings.redis_url or (embedded.url if embedded else "")
        store = RedisHistoryStore.from_url(
            url,
            capacity=settings.history_length,
            timeout_s=settings.redis_timeout_s,
            cluster=settings.redis_cluster,
        )
        bundle, base_items, cursor = await load_model(
            settings.bundle_path, settings, provider, store, metrics
        )
        batcher = MicroBatcher(
            max_batch=settings.max_batch,
            concurrency=settings.concurrent_batches,
            observe=metrics.observe_batch,
        )
        batcher.start()
        model = ModelHolder(bundle, base_items=base_items)
        svc = Services(settings, model, store, batcher, metrics, provider, items_cursor=cursor)
        app.state.services = svc
        sync = asyncio.create_task(keep_items_in_sync(svc), name="bbqrec-item-sync")
        svc.warmed_up = True
        metrics.model_info.labels(version=bundle.version, provider=provider).set(1)
        log.info("serving %s on %s", bundle.version, bundle.recommender.get_providers()[0])
        try:
            yield
        finally:
            sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sync
            await batcher.stop()
            await store.close()
            if embedded is not None:
                embedded.close()
            metrics.close()

    app = FastAPI(
        title="BBQRec",
        description="Next-item recommendation with behaviour-bound semantic IDs.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Where and what, never the offending input itself (it may be large or private).
        found = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        first = found[0] if found else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        reason = f"invalid request: {where}: {first['msg']}" if where else str(first["msg"])
        return JSONResponse(
            status_code=422, content={"detail": {"reason": reason, "errors": found[:20]}}
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Every error in one shape, `{"detail": {"reason": ...}}`, the framework's own too."""
        status, detail = exc.status_code, exc.detail
        if status == 400 and request.method == "POST":
            # FastAPI could not decode the body at all (e.g. bytes that are no Unicode text): the
            # same answer as any other body that is not JSON.
            status, detail = 422, "invalid request: body: not JSON text in UTF-8"
        content = detail if isinstance(detail, dict) else {"reason": str(detail)}
        return JSONResponse(status_code=status, content={"detail": content}, headers=exc.headers)

    app.add_middleware(Observe, metrics=metrics)

    @app.post(
        "/recommend",
        response_model=RecommendResponse,
        dependencies=[Depends(require_read_key)],
        responses=errors(401, 413, 422, 503),
    )
    async def recommend(body: RecommendRequest, svc: Svc, response: Response) -> RecommendResponse:
        # One bundle for the whole request: its indices, its batch, its version (a reload may
        # swap the bundle in service meanwhile).
        bundle = svc.bundle
        response.headers[MODEL_VERSION_HEADER] = bundle.version
        if body.history is not None:
            if len(body.history) > bundle.max_history:
                raise error(422, f"history longer than the model's {bundle.max_history} items")
            try:
                unknown = await resolve_items(svc, bundle, body.history)
            except (RedisError, OSError) as e:
                svc.metrics.redis_errors.labels("read").inc()
                raise unavailable("history store unavailable; could not look up item ids") from e
            if unknown:
                svc.metrics.unknown_items.labels("request").inc(len(unknown))
                raise error(422, "unknown item ids", unknown=unknown[:50])
            history = body.history
        else:
            start = time.perf_counter()
            try:
                stored = await svc.store.history(body.user_id)
            except (RedisError, OSError):
                # Degraded, not failed: without the stored history the answer is the
                # cold-start one (popularity), marked in a header and counted.
                svc.metrics.redis_errors.labels("read").inc()
                svc.metrics.degraded.labels("redis_unavailable").inc()
                response.headers[DEGRADED_HEADER] = "redis-unavailable"
                stored = []
            finally:
                svc.metrics.redis.labels("read").observe(time.perf_counter() - start)
            with contextlib.suppress(RedisError, OSError):  # items added on another replica
                missing = await resolve_items(svc, bundle, stored, skip=svc.missing_items)
                if len(svc.missing_items) + len(missing) <= MAX_MISSING_ITEMS:
                    svc.missing_items.update(missing)
            history = [i for i in stored if i in bundle.catalogue.index]
            if len(history) < len(stored):
                svc.metrics.unknown_items.labels("store").inc(len(stored) - len(history))
        catalogue = bundle.catalogue
        indices = np.array([catalogue.index[i] for i in history], dtype=np.int64)
        if len(indices) == 0:
            if DEGRADED_HEADER not in response.headers:
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
                items=items, model_version=bundle.version, cold_start=True, history_length=0
            )
        exclude = indices if body.exclude_seen else np.empty(0, dtype=np.int64)
        found, scores = await svc.batcher.submit(bundle, indices, body.k, exclude)
        # The batch may have run on a newer snapshot (an item added meanwhile); snapshots only
        # grow, so the latest one maps every returned index.
        latest = bundle.catalogue
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
            model_version=bundle.version,
            cold_start=False,
            history_length=len(indices),
        )

    @app.post(
        "/events",
        response_model=EventsResponse,
        dependencies=[Depends(require_key)],
        responses=errors(401, 413, 422, 503),
    )
    async def events(
        body: EventsRequest, svc: Svc, idempotency_key: IdempotencyKey = None
    ) -> EventsResponse:
        # The same timestamped event twice is a client retry, not two interactions; untimed
        # repeats are kept (a user may pick the same item again).
        stamped = [
            (e.user_id, e.item_id, e.timestamp) for e in body.events if e.timestamp is not None
        ]
        if len(set(stamped)) < len(stamped):
            raise error(422, "duplicate timestamped events; nothing was written")
        try:
            unknown = await resolve_items(svc, svc.bundle, [e.item_id for e in body.events])
        except (RedisError, OSError) as e:
            svc.metrics.redis_errors.labels("read").inc()
            raise unavailable("history store unavailable; the events were not acknowledged") from e
        if unknown:
            svc.metrics.unknown_items.labels("event").inc(len(unknown))
            raise error(422, "unknown item ids; nothing was written", unknown=unknown[:50])
        # Request order is time order, unless every event carries a timestamp.
        ordered = body.events
        if all(e.timestamp is not None for e in ordered):
            ordered = sorted(ordered, key=lambda e: e.timestamp or 0.0)
        start = time.perf_counter()
        try:
            replayed = await svc.store.append(
                [(e.user_id, e.item_id) for e in ordered],
                idempotency_key=idempotency_key,
                ttl_s=svc.settings.idempotency_ttl_s,
            )
        except IdempotencyConflictError as e:
            raise error(422, f"{e}; nothing was written") from e
        except (RedisError, OSError) as e:
            svc.metrics.redis_errors.labels("write").inc()
            # Not acknowledged is all we know: a write that timed out may still have landed
            # (a retry with an Idempotency-Key is safe either way).
            committed = list(e.committed) if isinstance(e, StoreUnavailableError) else []
            if committed:  # cluster: one transaction per slot, some went through
                raise unavailable(
                    "history store unavailable; only the events of committed_users were written",
                    committed_users=committed,
                ) from e
            raise unavailable("history store unavailable; the events were not acknowledged") from e
        finally:
            svc.metrics.redis.labels("write").observe(time.perf_counter() - start)
        return EventsResponse(accepted=len(ordered), replayed=replayed)

    @app.post(
        "/items",
        response_model=ItemResponse,
        status_code=201,
        dependencies=[Depends(require_key)],
        responses={
            200: {
                "model": ItemResponse,
                "description": "Added before from the same text and features (a retry); "
                "nothing was written",
            },
            **errors(401, 409, 413, 422, 503),
        },
    )
    async def add_item(body: NewItem, response: Response, svc: Svc) -> ItemResponse:
        """Add an item from its text or modality vectors (201). Sending an added item again
        with the same text and features answers 200 with what was stored (a client may retry
        after a lost reply); any other item of that id is a conflict (409)."""
        async with svc.items_lock:  # one writer at a time: each add builds on the last snapshot
            return await _add_item(body, response, svc)

    async def _add_item(body: NewItem, response: Response, svc: Svc) -> ItemResponse:
        bundle = svc.bundle
        catalogue = bundle.catalogue
        known = {m["name"] for m in bundle.manifest["modalities"]}
        if extra := sorted(body.features.keys() - known):
            raise error(422, "unknown modalities", unknown=extra[:50])
        with np.errstate(over="ignore"):
            features = {m: np.asarray(v, dtype=np.float32) for m, v in body.features.items()}
        if overflow := sorted(m for m, x in features.items() if not np.isfinite(x).all()):
            raise error(422, "feature values out of float32 range", modalities=overflow)
        source = item_source(body.text, features)  # kept, for bundles of other tokenizers
        if body.item_id in catalogue.index:
            response.status_code = 200
            return await _added_before(body.item_id, source, svc)
        if body.text is not None:
            if bundle.text is None:
                raise error(422, "this bundle has no text encoder; send features instead")
            if bundle.text.modality in features:
                raise error(422, f"give either text or features.{bundle.text.modality}")
            features[bundle.text.modality] = await asyncio.to_thread(bundle.text.embed, [body.text])
        try:
            codes, view_codes = bundle.quantize(features)
            # The SID is claimed in Redis, atomically across replicas: a free extra-level index
            # under the codes' prefix, used neither by this bundle nor by any added item.
            record = await svc.store.add_item(
                body.item_id,
                bundle.sid_space,
                source,
                codes[0].tolist(),
                catalogue.taken_extras(codes[0]),
                catalogue.codebook_size,
                view_codes[0].tolist(),
            )
        except ItemExistsError:  # added on another replica
            response.status_code = 200
            return await _added_before(body.item_id, source, svc)
        except (RedisError, OSError) as e:
            svc.metrics.redis_errors.labels("save_item").inc()
            raise unavailable("history store unavailable; the item was not added") from e
        except ValueError as e:
            raise error(422, str(e)) from e
        await adopt_items(svc.store, svc.metrics, bundle, {body.item_id: record})
        svc.metrics.items_added.inc()
        return ItemResponse(
            item_id=body.item_id,
            index=bundle.catalogue.index[body.item_id],
            semantic_id=list(record["codes"]["sid"]),
            added_at_serving_time=True,
        )

    async def _added_before(item_id: str, source: dict[str, Any], svc: Svc) -> ItemResponse:
        """An item that exists, sent to POST /items again: the item as stored when it was added
        at serving time from this very `source` (a retry), else a conflict."""
        model = svc.model
        bundle = model.bundle
        if bundle.catalogue.index.get(item_id, model.base_items) < model.base_items:
            raise error(409, "item already exists: it is in the bundle")
        try:
            record = (await svc.store.items_by_id([item_id], bundle.sid_space)).get(item_id)
            if record is not None and record.get("source") == source:
                await adopt_items(svc.store, svc.metrics, bundle, {item_id: record})
        except (RedisError, OSError) as e:
            svc.metrics.redis_errors.labels("read").inc()
            raise unavailable("history store unavailable; could not look up the item") from e
        if record is None:  # added at serving time, but no longer in Redis
            raise error(409, "item already exists")
        if record.get("source") != source:
            raise error(409, "item already exists, added from other text or features")
        if item_id not in bundle.catalogue.index:
            raise error(
                409, "item already exists; this bundle cannot quantize what it was added from"
            )
        i = bundle.catalogue.index[item_id]
        return ItemResponse(
            item_id=item_id,
            index=i,
            semantic_id=bundle.catalogue.sids[i].tolist(),
            added_at_serving_time=True,
        )

    @app.get(
        "/items/{item_id}",
        response_model=ItemResponse,
        dependencies=[Depends(require_read_key)],
        responses=errors(401, 404, 422, 503),
    )
    async def get_item(item_id: PathId, svc: Svc) -> ItemResponse:
        model = svc.model
        try:
            unknown = await resolve_items(svc, model.bundle, [item_id])
        except (RedisError, OSError) as e:
            svc.metrics.redis_errors.labels("read").inc()
            raise unavailable("history store unavailable; could not look up the item") from e
        if unknown:
            raise error(404, "unknown item id")
        catalogue = model.bundle.catalogue
        i = catalogue.index[item_id]
        return ItemResponse(
            item_id=item_id,
            index=i,
            semantic_id=catalogue.sids[i].tolist(),
            added_at_serving_time=i >= model.base_items,
        )

    @app.get(
        "/users/{user_id}/history",
        response_model=HistoryResponse,
        dependencies=[Depends(require_read_key)],
        responses=errors(401, 422, 503),
    )
    async def get_history(user_id: PathId, svc: Svc) -> HistoryResponse:
        try:
            items = await svc.store.history(user_id)
        except (RedisError, OSError) as e:
            svc.metrics.redis_errors.labels("read").inc()
            raise unavailable("history store unavailable") from e
        return HistoryResponse(user_id=user_id, items=items)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready; the fields say why."}},
    )
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

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_route() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/model", dependencies=[Depends(require_read_key)], responses=errors(401))
    async def model_info(svc: Svc) -> dict[str, Any]:
        m = svc.bundle.manifest
        return {
            "model_version": svc.bundle.version,
            "provider": svc.provider,
            "items": len(svc.bundle.catalogue.item_ids),
            "max_history": svc.bundle.max_history,
            "max_k": m["max_k"],
            "beam": svc.bundle.beam,
            "concurrent_batches": svc.batcher.concurrency,
            "intra_op_threads": settings.intra_op_threads,
            "modalities": m["modalities"],
        }

    @app.post(
        "/admin/reload",
        response_model=ReloadResponse,
        dependencies=[Depends(require_admin)],
        responses=errors(401, 403, 409, 413, 422),
    )
    async def reload(svc: Svc, body: ReloadRequest | None = None) -> ReloadResponse:
        """Load a bundle (the configured one, or `bundle_path`), verify and warm it up, then
        swap it in at once. Requests already batched finish on the old bundle; a bundle that
        fails to load is refused and the old one keeps serving."""
        if settings.workers > 1:
            raise error(
                409,
                f"this service runs {settings.workers} worker processes and a reload would swap "
                "the bundle of one of them; restart the service to change the bundle",
            )
        path = Path(body.bundle_path) if body and body.bundle_path else settings.bundle_path
        start = time.perf_counter()
        async with svc.reload_lock:
            try:
                bundle, base_items, cursor = await load_model(
                    path, settings, svc.provider, svc.store, metrics
                )
            # Whatever stops the new bundle from loading (a failed check, a missing file, a file
            # ONNX Runtime cannot read: its errors share no base class) refuses it; the old
            # bundle was never touched.
            except Exception as e:
                log.warning("reload refused: %s", e)
                raise error(422, f"bundle refused, still serving the old one: {e}") from e
            # Under the items lock: an item added while the new bundle loaded is not lost. Its
            # SID carries over under the same tokenizer; under another one the next sync
            # quantizes it again (it is in the log past the new bundle's cursor).
            async with svc.items_lock:
                old = svc.bundle.catalogue
                carried = [
                    (item_id, old.sids[old.index[item_id]], old.view_codes[old.index[item_id]])
                    for item_id in old.item_ids[svc.model.base_items :]
                    if item_id not in bundle.catalogue.index
                ]
                if svc.bundle.sid_space != bundle.sid_space:
                    carried = []
                bundle.catalogue = bundle.catalogue.with_items(carried)
                previous = svc.model.swap(bundle, base_items=base_items)
                svc.items_cursor = cursor
        metrics.model_info.remove(previous.version, svc.provider)
        metrics.model_info.labels(version=bundle.version, provider=svc.provider).set(1)
        log.info("swapped %s for %s", previous.version, bundle.version)
        return ReloadResponse(
            model_version=bundle.version,
            previous_version=previous.version,
            items=len(bundle.catalogue.item_ids),
            load_seconds=time.perf_counter() - start,
        )

    return app


def app_from_env() -> FastAPI:
    """The app with settings from BBQREC_* environment variables: the factory each worker of
    `bbqrec serve --workers N` builds (uvicorn imports it by name in every worker process)."""
    return create_app(Settings())  # type: ignore[call-arg]  # bundle_path from the environment
