"""Faults: Redis killed under load, killed with SIGKILL mid-stream of events, slowed down; and
damaged bundles. Each Redis test starts its own `redis-server` (AOF, appendfsync always) on a
free loopback port, and drives the app through its ASGI interface with concurrent requests."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import DEGRADED_HEADER, create_app
from service.manifest import BundleError, sha256
from service.settings import Settings
from service.store import history_key
from tests.service.redis_procs import RedisServer, binaries, free_port, redis_server

BUDGET_S = 0.3  # redis_timeout_s in these tests
MARGIN_S = 1.5  # generous: 2 shared cores, and this is a contract, not a benchmark


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def bundle_dir(exported: tuple[Path, Path]) -> Path:
    return exported[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as s:
        yield s


def item_ids(bundle_dir: Path) -> list[str]:
    return (bundle_dir / "item_ids.txt").read_text().split()


@asynccontextmanager
async def serving(
    bundle_dir: Path, redis_url: str, budget_s: float = 2.0
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, behind an in-process HTTP client (requests run concurrently
    on this event loop, as under uvicorn). The default Redis budget is generous: a dead Redis
    refuses connections at once, and a busy machine must not make a live one look dead."""
    settings = Settings(bundle_path=bundle_dir, redis_url=redis_url, redis_timeout_s=budget_s)
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bbqrec", timeout=30) as client,
    ):
        yield client


@dataclass
class Answer:
    kind: str  # stored | explicit | events
    start: float
    end: float
    status: int
    headers: httpx.Headers
    body: dict[str, Any]
    sent: list[tuple[str, str]]  # events: (user, item) pairs the request asked to write


async def call(client: httpx.AsyncClient, kind: str, path: str, payload: dict[str, Any]) -> Answer:
    start = time.monotonic()
    r = await client.post(path, json=payload)
    sent = [(e["user_id"], e["item_id"]) for e in payload.get("events", [])]
    return Answer(kind, start, time.monotonic(), r.status_code, r.headers, r.json(), sent)


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def until_ready(client: httpx.AsyncClient, want: bool, timeout_s: float = 15.0) -> float:
    """Polls /readyz until its `redis` field is `want`; returns when that was first seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = await client.get("/readyz")
        if r.json()["redis"] is want:
            assert (r.status_code == 200) is want
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz did not report redis={want} within {timeout_s} s")


@pytest.mark.anyio
async def test_redis_killed_under_load(bundle_dir: Path, server: RedisServer) -> None:
    ids = item_ids(bundle_dir)
    seen = [ids[3], ids[17], ids[42]]
    answers: list[Answer] = []
    stop = asyncio.Event()

    async def worker(n: int, client: httpx.AsyncClient) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            event = {"user_id": f"load-{n}-{seq}", "item_id": ids[seq % len(ids)]}
            for kind, path, payload in (
                ("stored", "/recommend", {"user_id": "regular", "k": 5}),
                ("explicit", "/recommend", {"user_id": "x", "history": seen, "k": 5}),
                ("events", "/events", {"events": [event]}),
            ):
                answers.append(await call(client, kind, path, payload))

    async with serving(bundle_dir, server.url) as client:
        events = {"events": [{"user_id": "regular", "item_id": i} for i in seen]}
        assert (await client.post("/events", json=events)).status_code == 200
        workers = [asyncio.create_task(worker(n, client)) for n in range(6)]
        await asyncio.sleep(0.5)
        killing = time.monotonic()
        await asyncio.to_thread(server.kill)
        killed = time.monotonic()
        await until_ready(client, want=False)
        await asyncio.sleep(1.0)  # load goes on against a dead Redis
        restarting = time.monotonic()
        await asyncio.to_thread(server.start)  # same port, same directory
        ready = await until_ready(client, want=True)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)
        metrics = (await client.get("/metrics")).text

    before = [a for a in answers if a.end < killing]
    during = [a for a in answers if a.start > killed and a.end < restarting]
    after = [a for a in answers if a.start > ready]
    assert before
    assert during
    assert after
    # /recommend always answers; from Redis when it is there, degraded (and saying so) when not.
    recommends = [a for a in answers if a.kind != "events"]
    assert all(a.status == 200 for a in recommends), {a.status for a in recommends}
    for a in recommends:
        degraded = a.headers.get(DEGRADED_HEADER)
        assert degraded in (None, "redis-unavailable")
        if a.kind == "explicit":
            assert degraded is None
            assert a.body["history_length"] == 3
        elif degraded:
            assert a.body["cold_start"]
            assert a.body["history_length"] == 0
            assert len(a.body["items"]) == 5
    for a in before + after:
        if a.kind == "stored":
            assert DEGRADED_HEADER not in a.headers
            assert a.body["history_length"] == 3
    assert all(DEGRADED_HEADER in a.headers for a in during if a.kind == "stored")
    n_degraded = sum(DEGRADED_HEADER in a.headers for a in recommends)
    assert metric(metrics, 'bbqrec_degraded_total{reason="redis_unavailable"}') == n_degraded
    # /events: 200 only for a write Redis acknowledged; 503 with Retry-After otherwise.
    writes = [a for a in answers if a.kind == "events"]
    assert {a.status for a in writes} <= {200, 503}
    for a in writes:
        if a.status == 503:
            assert int(a.headers["Retry-After"]) >= 1
            assert "not acknowledged" in a.body["detail"]["reason"]
    assert all(a.status == 503 for a in during if a.kind == "events")
    assert all(a.status == 200 for a in before + after if a.kind == "events")
    assert metric(metrics, "bbqrec_redis_errors_total") >= n_degraded + len(
        [a for a in during if a.kind == "events"]
    )
    with server.client() as c:  # nothing acknowledged was lost with the crash
        for a in writes:
            if a.status == 200:
                ((user, item),) = a.sent
                assert c.lrange(history_key(user), 0, -1) == [item]


@pytest.mark.anyio
async def test_no_acknowledged_event_is_lost_to_a_sigkill(
    bundle_dir: Path, server: RedisServer
) -> None:
    """appendfsync always: Redis writes and fsyncs the AOF before it replies, so an event the
    service acknowledged (200) is on disk before the client hears of it."""
    ids = item_ids(bundle_dir)
    answers: list[Answer] = []

    async def writer(n: int, client: httpx.AsyncClient) -> None:
        for seq in range(10_000):
            events = [
                {"user_id": f"w{n}-{seq}-{j}", "item_id": ids[(seq * 3 + j) % len(ids)]}
                for j in range(3)
            ]
            a = await call(client, "events", "/events", {"events": events})
            answers.append(a)
            if a.status != 200 and sum(b.status != 200 for b in answers) >= 30:
                return

    async with serving(bundle_dir, server.url) as client:
        writers = [asyncio.create_task(writer(n, client)) for n in range(8)]
        async with asyncio.timeout(60):
            while sum(a.status == 200 for a in answers) < 200:
                await asyncio.sleep(0.01)
        await asyncio.to_thread(server.kill)  # mid-stream: writers are still sending
        await asyncio.gather(*writers)

    acknowledged = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status != 200]
    assert {a.status for a in refused} == {503}
    assert len(acknowledged) >= 200
    assert len(refused) >= 30
    await asyncio.to_thread(server.start)  # from the same directory: the AOF is all there is
    with server.client() as c:
        lost = [
            (user, item)
            for a in acknowledged
            for user, item in a.sent
            if c.lrange(history_key(user), 0, -1) != [item]
        ]
    assert lost == [], f"{len(lost)} of {3 * len(acknowledged)} acknowledged events lost"


@pytest.mark.anyio
async def test_a_slow_redis_costs_the_budget_not_a_pile_up(
    bundle_dir: Path, server: RedisServer
) -> None:
    ids = item_ids(bundle_dir)
    sleep_s = 4
    _, cli = binaries()
    async with serving(bundle_dir, server.url, budget_s=BUDGET_S) as client:
        events = {"events": [{"user_id": "regular", "item_id": i} for i in ids[:3]]}
        assert (await client.post("/events", json=events)).status_code == 200
        # DEBUG SLEEP blocks the whole server; it runs on a connection of its own.
        sleeper = subprocess.Popen([cli, "-p", str(server.port), "DEBUG", "SLEEP", str(sleep_s)])
        await asyncio.sleep(0.3)
        start = time.monotonic()
        answers = await asyncio.gather(
            *(call(client, "stored", "/recommend", {"user_id": "regular"}) for _ in range(8)),
            *(
                call(client, "events", "/events", {"events": [{"user_id": "s", "item_id": i}]})
                for i in ids[:8]
            ),
        )
        ready = await client.get("/readyz")
        elapsed = time.monotonic() - start
        assert sleeper.poll() is None  # Redis was still asleep through all of it
        await asyncio.to_thread(sleeper.wait)
        after = await client.post("/recommend", json={"user_id": "regular"})
        metrics = (await client.get("/metrics")).text

    for a in answers:
        assert a.end - a.start < BUDGET_S + MARGIN_S, (a.kind, a.end - a.start)
        if a.kind == "stored":
            assert a.status == 200
            assert a.headers[DEGRADED_HEADER] == "redis-unavailable"
        else:
            assert a.status == 503
            assert a.headers["Retry-After"] == "1"
    assert ready.status_code == 503
    assert ready.json()["redis"] is False
    assert elapsed < 2 * BUDGET_S + MARGIN_S < sleep_s  # 16 requests at once, then /readyz
    assert after.status_code == 200
    assert DEGRADED_HEADER not in after.headers
    assert after.json()["history_length"] == 3
    assert metric(metrics, 'bbqrec_degraded_total{reason="redis_unavailable"}') == 8


def damage(bundle: Path, how: str) -> str:
    """Damages a bundle copy in place; returns what the refusal must say."""
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if how == "truncated-model":
        data = (bundle / "recommender.onnx").read_bytes()
        (bundle / "recommender.onnx").write_bytes(data[: len(data) // 2])
        return r"recommender\.onnx: sha256 does not match"
    if how == "truncated-manifest":
        text = manifest_path.read_text()
        manifest_path.write_text(text[: len(text) // 2])
        return r"manifest\.json: invalid JSON"
    if how == "flipped-byte":
        with (bundle / "view_codes.npy").open("r+b") as f:
            f.seek(-1, 2)
            f.write(b"\x7f")
        return r"view_codes\.npy: sha256 does not match"
    if how == "tables-of-another-export":  # and the manifest re-hashed to match them
        np.save(bundle / "sids.npy", np.load(bundle / "sids.npy")[:-5])
        manifest["files"]["sids.npy"] = sha256(bundle / "sids.npy")
        manifest_path.write_text(json.dumps(manifest))
        return r"sids\.npy: shape \(\d+, \d+\), but item_ids\.txt and the manifest make it"
    # a manifest written for another graph
    manifest["modalities"][0]["input"] = "features_elsewhere"
    manifest_path.write_text(json.dumps(manifest))
    return r"quantizer\.onnx: inputs .* the manifest says .*features_elsewhere"


DAMAGES = [
    "truncated-model",
    "truncated-manifest",
    "flipped-byte",
    "tables-of-another-export",
    "graph-of-another-export",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_bundle_stops_the_service_from_starting(
    bundle_dir: Path, tmp_path: Path, how: str
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    match = damage(copy, how)
    settings = Settings(bundle_path=copy, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(BundleError, match=match), TestClient(create_app(settings)):
        pass
