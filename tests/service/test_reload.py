"""Hot swap: `POST /admin/reload` under continuous load, against a real Redis (database 15).

The second bundle is the first with its catalogue stored in reverse order and a new version: the
same model, so every answer for a fixed history must name the same items whichever bundle
served it, but every item index differs. A request whose indices went through the wrong
bundle's tables would answer other items.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import DEGRADED_HEADER, MODEL_VERSION_HEADER, Services, create_app
from service.bundle import Bundle
from service.inference import MicroBatcher
from service.manifest import MANIFEST, sha256
from service.settings import Settings
from tests.service.conftest import REDIS_URL, UNHURRIED_REDIS_S

KEY = "admin-s3cret"
ADMIN = {"X-API-Key": KEY}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def reversed_copy(src: Path, dst: Path, version: str) -> Path:
    """`src` with its catalogue in reverse order, re-hashed, under a new model version."""
    shutil.copytree(src, dst)
    ids = (src / "item_ids.txt").read_text().split()
    (dst / "item_ids.txt").write_text("\n".join(reversed(ids)) + "\n")
    for table in ("sids.npy", "view_codes.npy", "popularity.npy"):
        np.save(dst / table, np.load(src / table)[::-1].copy())
    manifest = json.loads((src / MANIFEST).read_text())
    manifest["model_version"] = version
    manifest["files"] = {name: sha256(dst / name) for name in manifest["files"]}
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


@pytest.fixture
def bundles(exported: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    a = tmp_path / "a"
    shutil.copytree(exported[1], a)
    return a, reversed_copy(a, tmp_path / "b", "swap-test-b")


def version(bundle: Path) -> str:
    return str(json.loads((bundle / MANIFEST).read_text())["model_version"])


class AppClient(httpx.AsyncClient):
    services: Services  # the app's state, for tests that reach inside


@asynccontextmanager
async def serving(bundle: Path, **overrides: Any) -> AsyncIterator[AppClient]:
    """The app with its lifespan behind an in-process client (requests run concurrently on this
    event loop, as under uvicorn); `client.services` is the app's state."""
    settings = Settings(
        bundle_path=bundle, **({"redis_url": REDIS_URL, "api_key": KEY} | overrides)
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        AppClient(transport=transport, base_url="http://bbqrec", timeout=60) as client,
    ):
        client.services = app.state.services
        yield client


def hold_batches(services: Services) -> tuple[threading.Event, threading.Event]:
    """From now on, a batch on the bundle in service blocks (in its thread) until `release` is
    set; `entered` says one is blocked. A swap made meanwhile lands with a batch in flight."""
    bundle = services.bundle
    run = bundle.recommend
    entered, release = threading.Event(), threading.Event()

    def held(
        histories: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        entered.set()
        release.wait(timeout=30)
        return run(histories, k, exclude)

    bundle.recommend = held  # type: ignore[method-assign]
    return entered, release


def answer(r: httpx.Response) -> tuple[str, list[str]]:
    """(version that served it, items) of a successful, not degraded /recommend; the version the
    body names must be the one the header names."""
    assert r.status_code == 200, r.text
    # degraded = the stored history could not be read in time: a popularity answer
    assert DEGRADED_HEADER not in r.headers, r.headers[DEGRADED_HEADER]
    body = r.json()
    assert r.headers[MODEL_VERSION_HEADER] == body["model_version"]
    return body["model_version"], [i["item_id"] for i in body["items"]]


@pytest.mark.anyio
@pytest.mark.usefixtures("clean_redis")
async def test_swap_under_load_fails_no_request(bundles: tuple[Path, Path]) -> None:
    a, b = bundles
    ids = (a / "item_ids.txt").read_text().split()
    history = [ids[3], ids[17], ids[42]]
    stop = asyncio.Event()
    # per worker: (version, items, when the answer came), in order; items None for cold start
    # (its popularity ties break by index, which the reversed catalogue changes)
    seen: list[list[tuple[str, list[str] | None, float]]] = [[] for _ in range(8)]

    # The swap is under test, not Redis latency: on a loaded machine eight busy workers can hold
    # a stored-history read past the default Redis budget, and the answer would be degraded.
    async with serving(a, redis_timeout_s=UNHURRIED_REDIS_S) as client:
        expected = answer(
            await client.post("/recommend", json={"user_id": "x", "history": history})
        )
        assert expected[0] == version(a)
        events = [{"user_id": "stored", "item_id": i} for i in history]
        assert (await client.post("/events", json={"events": events}, headers=ADMIN)).is_success

        async def worker(n: int) -> None:
            # explicit history, stored history, cold start: every path names its version
            while not stop.is_set():
                for body in (
                    {"user_id": "x", "history": history},
                    {"user_id": "stored"},
                    {"user_id": f"new-{n}", "k": 3},
                ):
                    served, items = answer(await client.post("/recommend", json=body))
                    cold = body["user_id"] == f"new-{n}"
                    seen[n].append((served, None if cold else items, time.monotonic()))

        workers = [asyncio.create_task(worker(n)) for n in range(len(seen))]
        while sum(map(len, seen)) < 48:
            await asyncio.sleep(0.01)
        entered, release = hold_batches(client.services)
        while not entered.is_set():
            await asyncio.sleep(0.001)
        # a batch on the old bundle is in flight, more requests for it queue behind
        r = await client.post("/admin/reload", json={"bundle_path": str(b)}, headers=ADMIN)
        swapped = time.monotonic()
        await asyncio.sleep(0.05)  # requests for the new bundle join the queue
        release.set()
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == version(b)
        assert r.json()["previous_version"] == version(a)
        after = sum(map(len, seen))
        while sum(map(len, seen)) < after + 96:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*workers)  # re-raises the first failed request, if any

        answers = [x for per_worker in seen for x in per_worker]
        assert {v for v, _, _ in answers} == {version(a), version(b)}
        # requests in flight at the swap finished on the old bundle, with the old bundle's items
        assert any(v == version(a) and t > swapped for v, _, t in answers)
        wrong = [(v, got) for v, got, _ in answers if got is not None and got != expected[1]]
        assert not wrong, (expected, wrong[:3])
        for per_worker in seen:  # once a worker saw the new bundle it never sees the old one
            versions = [v for v, _, _ in per_worker]
            assert versions == sorted(versions, key=lambda v: v == version(b))
        final = await client.post("/recommend", json={"user_id": "x", "history": history})
        assert answer(final) == (version(b), expected[1])
        assert (await client.get("/model")).json()["model_version"] == version(b)
        metrics = (await client.get("/metrics")).text
        assert f'version="{version(b)}"' in metrics
        assert f'version="{version(a)}"' not in metrics


@pytest.mark.anyio
async def test_a_batch_taken_across_a_swap_runs_once_per_bundle(
    bundles: tuple[Path, Path],
) -> None:
    """Queries queued for the old bundle and for the new one, taken in one batch: one ONNX
    Runtime call each, on its own bundle, each answer mapped by its own catalogue."""
    old, new = Bundle(bundles[0]), Bundle(bundles[1])
    calls: list[tuple[str, int]] = []
    entered, release = threading.Event(), threading.Event()
    for bundle in (old, new):
        run = bundle.recommend

        def recorded(
            histories: np.ndarray,
            k: int,
            exclude: np.ndarray | None = None,
            run: Callable[..., tuple[np.ndarray, np.ndarray]] = run,
            version: str = bundle.version,
        ) -> tuple[np.ndarray, np.ndarray]:
            calls.append((version, len(histories)))
            entered.set()
            release.wait(timeout=30)
            return run(histories, k, exclude)

        bundle.recommend = recorded  # type: ignore[method-assign]
    history = old.catalogue.item_ids[:3]
    empty = np.empty(0, dtype=np.int64)

    def query(bundle: Bundle) -> asyncio.Task[tuple[np.ndarray, np.ndarray]]:
        indices = np.array([bundle.catalogue.index[i] for i in history], dtype=np.int64)
        return asyncio.create_task(batcher.submit(bundle, indices, 5, empty))

    batcher = MicroBatcher(max_batch=64)
    batcher.start()
    try:
        first = query(old)
        while not entered.is_set():  # the first batch is in flight (held)
            await asyncio.sleep(0.001)
        queued = [query(b) for b in (old, new, old, new)]
        await asyncio.sleep(0.05)  # all four wait in the queue
        release.set()
        results = await asyncio.gather(first, *queued)
    finally:
        await batcher.stop()
    assert calls == [(old.version, 1), (old.version, 2), (new.version, 2)]
    named = [
        [b.catalogue.item_ids[i] for i in found]
        for b, (found, _) in zip((old, old, new, old, new), results, strict=True)
    ]
    assert all(items == named[0] for items in named)


def corrupt(bundle: Path) -> None:
    data = bytearray((bundle / "recommender.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "recommender.onnx").write_bytes(bytes(data))


def not_a_model(bundle: Path) -> None:
    """Hashes that match, but a recommender.onnx that is no ONNX model."""
    (bundle / "recommender.onnx").write_bytes(b"not a model")
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["recommender.onnx"] = sha256(bundle / "recommender.onnx")
    (bundle / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.anyio
@pytest.mark.usefixtures("clean_redis")
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt, "sha256 does not match"),
        (not_a_model, "recommender.onnx"),
        (lambda b: (b / "sids.npy").unlink(), "missing"),
        (lambda b: shutil.rmtree(b), "missing"),
    ],
    ids=["hash-mismatch", "not-a-model", "missing-file", "missing-bundle"],
)
async def test_a_bad_bundle_is_refused_and_the_old_one_keeps_serving(
    bundles: tuple[Path, Path], damage: Any, reason: str
) -> None:
    a, b = bundles
    damage(b)
    async with serving(a) as client:
        r = await client.post("/admin/reload", json={"bundle_path": str(b)}, headers=ADMIN)
        assert r.status_code == 422
        assert reason in r.json()["detail"]["reason"]
        assert "still serving the old one" in r.json()["detail"]["reason"]
        ids = (a / "item_ids.txt").read_text().split()
        ok = await client.post("/recommend", json={"user_id": "x", "history": ids[:2]})
        assert answer(ok)[0] == version(a)
        assert (await client.get("/readyz")).status_code == 200


@pytest.mark.anyio
@pytest.mark.usefixtures("clean_redis")
async def test_reload_rereads_the_configured_bundle_and_keeps_added_items(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    live = tmp_path / "live"
    shutil.copytree(exported[1], live)
    async with serving(live) as client:
        ids = (live / "item_ids.txt").read_text().split()
        features = {
            m["name"]: [0.1] * m["dim"] for m in (await client.get("/model")).json()["modalities"]
        }
        r = await client.post(
            "/items", json={"item_id": "NEW-1", "features": features}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        # the deployment replaces the bundle in place, then asks for a reload
        new = reversed_copy(exported[1], tmp_path / "next", "in-place-v2")
        shutil.rmtree(live)
        shutil.copytree(new, live)
        r = await client.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "in-place-v2"
        assert r.json()["items"] == len(ids) + 1
        item = await client.get("/items/NEW-1")
        assert item.status_code == 200
        assert item.json()["added_at_serving_time"]
        assert (await client.get(f"/items/{ids[0]}")).json()["index"] == len(ids) - 1


@pytest.mark.anyio
@pytest.mark.usefixtures("clean_redis")
async def test_reload_needs_the_key_and_is_off_without_one(bundles: tuple[Path, Path]) -> None:
    a, b = bundles
    body = {"bundle_path": str(b)}
    async with serving(a) as client:
        assert (await client.post("/admin/reload", json=body)).status_code == 401
        wrong = {"X-API-Key": "wrong"}
        assert (await client.post("/admin/reload", json=body, headers=wrong)).status_code == 401
        assert (await client.get("/model")).json()["model_version"] == version(a)
    async with serving(a, api_key=None) as client:
        r = await client.post("/admin/reload", json=body)
        assert r.status_code == 403
        assert "no API key is configured" in r.json()["detail"]["reason"]


@pytest.mark.anyio
@pytest.mark.usefixtures("clean_redis")
async def test_items_added_under_one_tokenizer_are_quantized_again_under_another(
    exported: tuple[Path, Path], retokenized: tuple[Path, Path], tmp_path: Path
) -> None:
    """A retrained tokenizer means other codebooks: an added item's SID from the old one means
    nothing there (and may be a new item's SID). The new bundle quantizes the item again from
    the features it was added with and claims a free SID in its own codebooks, once for every
    replica; the old bundle still finds the item's first SID."""
    a = tmp_path / "a"
    shutil.copytree(exported[1], a)
    other = Bundle(retokenized[1])
    assert other.sid_space != Bundle(a).sid_space
    rng = np.random.default_rng(0)
    features = {
        m["name"]: rng.standard_normal(m["dim"]).tolist() for m in other.manifest["modalities"]
    }
    ids = (a / "item_ids.txt").read_text().split()
    async with serving(a) as client:
        r = await client.post(
            "/items", json={"item_id": "NEW", "features": features}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        sid_a = r.json()["semantic_id"]
        reload = {"bundle_path": str(retokenized[1])}
        r = await client.post("/admin/reload", json=reload, headers=ADMIN)
        assert r.status_code == 200, r.text
        item = (await client.get("/items/NEW")).json()
        sid = item["semantic_id"]
        prefix, _ = other.quantize({m: np.asarray(v) for m, v in features.items()})
        assert sid[:-1] == prefix[0].tolist()  # the new codebooks' codes, not the old SID
        assert tuple(sid) not in {tuple(s) for s in other.catalogue.sids.tolist()}
        assert item["index"] == len(other.catalogue.item_ids)
        metrics = (await client.get("/metrics")).text
        assert "bbqrec_items_requantized_total 1.0" in metrics
        # recommendable under the new bundle, as a history item and as an answer
        history = {"user_id": "u", "history": ["NEW", ids[0]], "k": 100}
        assert (await client.post("/recommend", json=history)).status_code == 200
        # another replica on the new bundle finds the same SID (claimed once)
        async with serving(retokenized[1]) as replica:
            assert (await replica.get("/items/NEW")).json()["semantic_id"] == sid
            assert "bbqrec_items_requantized_total 0.0" in (await replica.get("/metrics")).text
        # back on the first bundle: the first SID
        r = await client.post("/admin/reload", json={"bundle_path": str(a)}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (await client.get("/items/NEW")).json()["semantic_id"] == sid_a


@pytest.mark.anyio
@pytest.mark.usefixtures("clean_redis")
async def test_an_item_the_new_bundle_cannot_quantize_is_left_out_and_counted(
    exported: tuple[Path, Path], text_exported: tuple[Path, Path]
) -> None:
    async with serving(exported[1]) as client:
        features = {
            m["name"]: [0.1] * m["dim"] for m in (await client.get("/model")).json()["modalities"]
        }
        r = await client.post(
            "/items", json={"item_id": "NEW", "features": features}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        # a text-only bundle: the item was added with CLIP vectors, no text
        reload = {"bundle_path": str(text_exported[1])}
        r = await client.post("/admin/reload", json=reload, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (await client.get("/items/NEW")).status_code == 404
        # an unknown item to every route, not an error, and not quantized again each time
        history = {"user_id": "u", "history": ["NEW"]}
        r = await client.post("/recommend", json=history)
        assert r.status_code == 422
        assert r.json()["detail"]["unknown"] == ["NEW"]
        event = {"events": [{"user_id": "u", "item_id": "NEW"}]}
        assert (await client.post("/events", json=event, headers=ADMIN)).status_code == 422
        assert "bbqrec_items_unplaced_total 1.0" in (await client.get("/metrics")).text
