"""Bad input at the edges: each request gets a 4xx JSON answer with a reason, and Redis (the
real server, database 15) holds exactly what it held before."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import REDIS_URL

KEY = "bad-input-s3cret"
BODY_LIMIT = 64 * 1024
MAX_HISTORY = 20  # the tiny bundle's max_history (checked below)


@pytest.fixture(scope="module")
def client(exported: tuple[Path, Path]) -> Iterator[TestClient]:
    manifest = json.loads((exported[1] / "manifest.json").read_text())
    assert manifest["max_history"] == MAX_HISTORY
    settings = Settings(
        bundle_path=exported[1],
        redis_url=REDIS_URL,
        api_key=SecretStr(KEY),
        max_body_bytes=BODY_LIMIT,
    )
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as c:
        yield c


@pytest.fixture(scope="module")
def items(exported: tuple[Path, Path]) -> list[str]:
    return (exported[1] / "item_ids.txt").read_text().split()


@pytest.fixture
def store(clean_redis: redis.Redis, items: list[str]) -> redis.Redis:
    """The database with one user's history in it, so a wrong write or deletion shows."""
    clean_redis.lpush("bbqrec:{seeded}:hist", items[0], items[1])
    return clean_redis


def snapshot(r: redis.Redis) -> dict[Any, Any]:
    """Every key with its value (lists and hashes are all this service writes)."""
    out: dict[Any, Any] = {}
    for key in r.scan_iter():
        kind = r.type(key)
        out[key] = r.lrange(key, 0, -1) if kind == b"list" else r.hgetall(key)
    return out


def chunked(data: bytes) -> Iterator[bytes]:
    """A body sent without Content-Length (Transfer-Encoding: chunked)."""
    for i in range(0, len(data), 512):
        yield data[i : i + 512]


def events(n: int, item: str = "ITEM", **extra: Any) -> dict[str, Any]:
    return {"events": [{"user_id": "u", "item_id": item, **extra} for _ in range(n)]}


def features(dim: int, value: Any = 0.5) -> list[Any]:
    return [value] * dim


# (case id, method, path, request kwargs, expected status); "ITEM" stands for a real item id.
CASES: list[tuple[str, str, str, dict[str, Any], int]] = [
    ("recommend-empty-body", "POST", "/recommend", {"content": b""}, 422),
    ("events-empty-body", "POST", "/events", {"content": b""}, 422),
    ("items-empty-body", "POST", "/items", {"content": b""}, 422),
    ("events-empty-list", "POST", "/events", {"json": {"events": []}}, 422),
    ("not-json", "POST", "/events", {"content": b"{not json"}, 422),
    ("json-array", "POST", "/recommend", {"json": ["u"]}, 422),
    ("json-string", "POST", "/events", {"json": "events"}, 422),
    ("non-utf8", "POST", "/recommend", {"content": b'{"user_id": "\xff\xfe"}'}, 422),
    ("non-utf8-events", "POST", "/events", {"content": b'{"events": [{"user_id": "\xc3"}]}'}, 422),
    ("undecodable-bytes", "POST", "/events", {"content": b"\x00\x01\xfe"}, 422),
    ("oversized", "POST", "/events", {"json": events(1000, user_id="u" * 100)}, 413),
    (
        "oversized-chunked",
        "POST",
        "/events",
        {"content": chunked(json.dumps(events(1000, user_id="u" * 100)).encode())},
        413,
    ),
    ("bad-content-length", "POST", "/events", {"headers": {"Content-Length": "-1"}}, 413),
    ("k-zero", "POST", "/recommend", {"json": {"user_id": "u", "k": 0}}, 422),
    ("k-negative", "POST", "/recommend", {"json": {"user_id": "u", "k": -1}}, 422),
    ("k-101", "POST", "/recommend", {"json": {"user_id": "u", "k": 101}}, 422),
    ("k-huge", "POST", "/recommend", {"json": {"user_id": "u", "k": 10**30}}, 422),
    ("k-float", "POST", "/recommend", {"json": {"user_id": "u", "k": 1.5}}, 422),
    ("k-string", "POST", "/recommend", {"json": {"user_id": "u", "k": "ten"}}, 422),
    ("user-missing", "POST", "/recommend", {"json": {"k": 3}}, 422),
    ("user-empty", "POST", "/recommend", {"json": {"user_id": ""}}, 422),
    ("user-too-long", "POST", "/recommend", {"json": {"user_id": "u" * 129}}, 422),
    ("user-not-a-string", "POST", "/recommend", {"json": {"user_id": 7}}, 422),
    ("user-null", "POST", "/events", {"json": {"events": [{"user_id": None}]}}, 422),
    ("history-unknown", "POST", "/recommend", {"json": {"user_id": "u", "history": ["NOPE"]}}, 422),
    ("history-empty-id", "POST", "/recommend", {"json": {"user_id": "u", "history": [""]}}, 422),
    (
        "history-too-long",
        "POST",
        "/recommend",
        {"json": {"user_id": "u", "history": ["ITEM"] * (MAX_HISTORY + 1)}},
        422,
    ),
    ("events-unknown-item", "POST", "/events", {"json": events(1, "NOPE")}, 422),
    ("events-item-too-long", "POST", "/events", {"json": events(1, "i" * 129)}, 422),
    ("events-over-1000", "POST", "/events", {"json": events(1001)}, 422),
    ("events-nan-timestamp", "POST", "/events", {"content": b"NAN_EVENT"}, 422),
    (
        "events-duplicate",
        "POST",
        "/events",
        {"json": events(2, timestamp=1700000000.0)},
        422,
    ),
    ("items-unknown-modality", "POST", "/items", {"json": {"item_id": "N", "features": {}}}, 422),
    ("items-wrong-dim", "POST", "/items", {"json": {"item_id": "N", "features": "DIM3"}}, 422),
    ("items-existing", "POST", "/items", {"json": {"item_id": "ITEM", "features": "OK"}}, 409),
    ("items-nan-feature", "POST", "/items", {"content": b"NAN_FEATURES"}, 422),
    ("items-float32-overflow", "POST", "/items", {"content": b"HUGE_FEATURES"}, 422),
    ("get-item-unknown", "GET", "/items/NOPE", {}, 404),
    ("get-item-too-long", "GET", "/items/" + "i" * 129, {}, 422),
    ("history-user-too-long", "GET", "/users/" + "u" * 129 + "/history", {}, 422),
    ("reload-not-an-object", "POST", "/admin/reload", {"json": [1]}, 422),
    ("reload-missing-dir", "POST", "/admin/reload", {"json": {"bundle_path": "/nonexistent"}}, 422),
]


def prepare(kwargs: dict[str, Any], items: list[str], modalities: dict[str, int]) -> dict[str, Any]:
    """Fill the placeholders that need the bundle: a real item id, feature vectors of the right
    or a wrong size, and bodies with NaN (Python's JSON reader accepts it; the service must not)."""
    if "json" in kwargs:
        text = json.dumps(kwargs["json"]).replace('"ITEM"', json.dumps(items[2]))
        real = {name: features(dim) for name, dim in modalities.items()}
        wrong = {name: features(3) for name in modalities}
        text = text.replace('"OK"', json.dumps(real)).replace('"DIM3"', json.dumps(wrong))
        return kwargs | {"json": json.loads(text)}
    if kwargs.get("content") == b"NAN_EVENT":
        event = f'{{"user_id": "u", "item_id": "{items[2]}", "timestamp": NaN}}'
        return {"content": f'{{"events": [{event}]}}'.encode()}
    if kwargs.get("content") in (b"NAN_FEATURES", b"HUGE_FEATURES"):
        # NaN, or a finite double that is infinite as float32
        bad = "NaN" if kwargs["content"] == b"NAN_FEATURES" else "1e300"
        feats = ", ".join(f'"{m}": [{bad}{", 0.5" * (dim - 1)}]' for m, dim in modalities.items())
        return {"content": f'{{"item_id": "N", "features": {{{feats}}}}}'.encode()}
    return kwargs


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_is_refused_with_a_reason_and_writes_nothing(
    client: TestClient,
    store: redis.Redis,
    items: list[str],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
) -> None:
    modalities = {m["name"]: m["dim"] for m in client.get("/model").json()["modalities"]}
    kwargs = prepare(kwargs, items, modalities)
    before = snapshot(store)
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    reason = r.json()["detail"]["reason"]
    assert isinstance(reason, str)
    assert reason
    assert snapshot(store) == before
    assert client.get("/users/seeded/history").json()["items"] == [items[0], items[1]]


def test_validation_errors_say_where_and_do_not_echo_the_input(client: TestClient) -> None:
    secret = "private-" + "x" * 40
    r = client.post("/recommend", json={"user_id": secret, "k": 0})
    detail = r.json()["detail"]
    assert detail["reason"].startswith("invalid request: body.k:")
    assert detail["errors"][0]["loc"] == ["body", "k"]
    assert secret not in r.text


def test_untimed_repeats_are_separate_interactions(
    client: TestClient, store: redis.Redis, items: list[str]
) -> None:
    """Documented contract: without timestamps the same (user, item) twice is two events (a user
    may pick an item again); only a repeated *timestamped* event is refused as a duplicate."""
    before = snapshot(store)
    r = client.post("/events", json=events(2, items[2]))
    assert r.status_code == 200
    assert snapshot(store) != before  # the snapshot the bad-input cases compare sees writes
    assert client.get("/users/u/history").json()["items"] == [items[2], items[2]]
    stamped = [
        {"user_id": "v", "item_id": items[2], "timestamp": 1.0},
        {"user_id": "v", "item_id": items[2], "timestamp": 2.0},
    ]
    assert client.post("/events", json={"events": stamped}).status_code == 200
