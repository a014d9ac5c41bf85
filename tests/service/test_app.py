"""The service against a real Redis server (127.0.0.1:6379, database 15; CI starts one)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.bundle import Bundle
from service.settings import Settings
from service.store import history_key
from tests.service.conftest import REDIS_URL
from tests.service.redis_procs import servers_in
from training.data import left_pad, load_dataset

MODALITIES = ("clip_vitb32_image", "clip_vitb32_text")


@pytest.fixture
def bundle_dir(exported: tuple[Path, Path]) -> Path:
    return exported[1]


def make_client(bundle_dir: Path, **overrides: Any) -> TestClient:
    settings = Settings(bundle_path=bundle_dir, **({"redis_url": REDIS_URL} | overrides))
    return TestClient(create_app(settings))


@pytest.fixture
def client(bundle_dir: Path, clean_redis: None) -> Iterator[TestClient]:
    with make_client(bundle_dir) as c:
        yield c


def item_ids() -> tuple[str, ...]:
    return load_dataset().item_ids


def test_recommend_uses_the_stored_history_and_excludes_seen(client: TestClient) -> None:
    ids = item_ids()
    seen = [ids[3], ids[17], ids[42]]
    r = client.post("/events", json={"events": [{"user_id": "u1", "item_id": i} for i in seen]})
    assert r.status_code == 200
    assert r.json() == {"accepted": 3, "replayed": False}
    assert client.get("/users/u1/history").json()["items"] == seen

    r = client.post("/recommend", json={"user_id": "u1", "k": 20})
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) == 20
    assert body["history_length"] == 3
    assert not body["cold_start"]
    assert not {i["item_id"] for i in body["items"]} & set(seen)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(len(i["semantic_id"]) == 3 for i in body["items"])
    assert body["model_version"]


def test_explicit_history_is_used_as_given(client: TestClient) -> None:
    ids = item_ids()
    a = client.post("/recommend", json={"user_id": "nobody", "history": [ids[5], ids[6]]}).json()
    b = client.post("/recommend", json={"user_id": "other", "history": [ids[5], ids[6]]}).json()
    assert a["items"] == b["items"]
    assert not a["cold_start"]


def test_the_beam_width_is_a_setting(bundle_dir: Path, clean_redis: None) -> None:
    """BBQREC_BEAM reaches the search: the service answers what a bundle opened with that
    width returns (k = 3 with a beam of 1 keeps 3 prefixes, narrower than the bundle's 20)."""
    ids = item_ids()
    history = [ids[5], ids[6], ids[9]]
    rows = left_pad([np.array([5, 6, 9])], 20)
    body = {"user_id": "u", "history": history, "k": 3}
    for beam, want in ((1, 1), (None, 20)):
        extra = {} if beam is None else {"beam": beam}
        with make_client(bundle_dir, **extra) as c:
            assert c.get("/model").json()["beam"] == want
            got = [it["item_id"] for it in c.post("/recommend", json=body).json()["items"]]
        bundle = Bundle(bundle_dir, beam=beam)
        items = bundle.recommend(rows, 3, rows)[0][0]
        assert got == [bundle.catalogue.item_ids[i] for i in items]
    with pytest.raises(ValueError, match="beam"):
        Settings(bundle_path=bundle_dir, beam=0)


def test_concurrent_batches_is_a_setting(bundle_dir: Path, clean_redis: None) -> None:
    """BBQREC_CONCURRENT_BATCHES reaches the batcher, and answers do not depend on it."""
    ids = item_ids()
    body = {"user_id": "u", "history": [ids[5], ids[6], ids[9]], "k": 5}
    answers = []
    for n in (1, 3):
        with make_client(bundle_dir, concurrent_batches=n) as c:
            assert c.get("/model").json()["concurrent_batches"] == n
            answers.append(
                [it["item_id"] for it in c.post("/recommend", json=body).json()["items"]]
            )
    assert answers[0] == answers[1]


def test_cold_start_answers_by_popularity_and_is_counted(client: TestClient) -> None:
    r = client.post("/recommend", json={"user_id": "new-user", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["cold_start"]
    assert len(body["items"]) == 5
    pops = [i["score"] for i in body["items"]]
    assert pops == sorted(pops, reverse=True)
    assert "bbqrec_cold_start_total 1.0" in client.get("/metrics").text


def test_unknown_items_are_refused_and_nothing_is_written(client: TestClient) -> None:
    ids = item_ids()
    r = client.post(
        "/events",
        json={
            "events": [{"user_id": "u2", "item_id": ids[1]}, {"user_id": "u2", "item_id": "NOPE"}]
        },
    )
    assert r.status_code == 422
    assert r.json()["detail"]["unknown"] == ["NOPE"]
    assert client.get("/users/u2/history").json()["items"] == []
    r = client.post("/recommend", json={"user_id": "u2", "history": ["NOPE", ids[1]]})
    assert r.status_code == 422
    assert r.json()["detail"]["unknown"] == ["NOPE"]


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "u", "k": 0},
        {"user_id": "u", "k": 101},
        {"user_id": ""},
        {"k": 10},
        {"user_id": "u", "history": ["x"] * 21},
    ],
)
def test_bad_recommend_requests_get_422(client: TestClient, body: dict[str, Any]) -> None:
    assert client.post("/recommend", json=body).status_code == 422


def test_histories_are_capped(bundle_dir: Path, clean_redis: None) -> None:
    ids = item_ids()
    with make_client(bundle_dir, history_length=4) as c:
        events = [{"user_id": "u", "item_id": ids[i]} for i in range(10)]
        assert c.post("/events", json={"events": events}).status_code == 200
        assert c.get("/users/u/history").json()["items"] == list(ids[6:10])


def look_alike(client: TestClient, history: list[str]) -> dict[str, list[float]]:
    """The features of a top-10 item for `history`: the one whose SID prefix holds the fewest
    items, so that a new item with them takes an extra-level index the model saw often."""
    ds = load_dataset()
    catalogue = client.app.state.services.bundle.catalogue  # type: ignore[attr-defined]
    top = client.post("/recommend", json={"user_id": "x", "history": history, "k": 10}).json()
    ranked = [ds.item_ids.index(i["item_id"]) for i in top["items"]]
    best = min(ranked, key=lambda i: len(catalogue.taken_extras(catalogue.sids[i][:-1])))
    return {m: ds.features[m][best].tolist() for m in MODALITIES}


def test_new_item_is_recommendable_at_once_and_survives_a_restart(
    bundle_dir: Path, clean_redis: None
) -> None:
    ds = load_dataset()
    ids = ds.item_ids
    with make_client(bundle_dir) as c:
        history = [ids[3], ids[17], ids[42]]
        # a new item with a top item's content shares its SID prefix (a sibling in the trie)
        features = look_alike(c, history)
        r = c.post("/items", json={"item_id": "NEW-1", "features": features})
        assert r.status_code == 201, r.text
        added = r.json()
        assert added["added_at_serving_time"]
        assert added["index"] == len(ids)
        recs = c.post("/recommend", json={"user_id": "x", "history": history, "k": 100}).json()
        assert "NEW-1" in [i["item_id"] for i in recs["items"]]
        # sent again as it was (a retry after a lost reply): the stored item, nothing written
        again = c.post("/items", json={"item_id": "NEW-1", "features": features})
        assert again.status_code == 200, again.text
        assert again.json() == added
        other = {m: [-x for x in v] for m, v in features.items()}
        r = c.post("/items", json={"item_id": "NEW-1", "features": other})
        assert r.status_code == 409
        assert "other text or features" in r.json()["detail"]["reason"]
        r = c.post("/items", json={"item_id": ids[5], "features": features})
        assert r.status_code == 409
        assert "in the bundle" in r.json()["detail"]["reason"]
        assert "bbqrec_items_added_total 1.0" in c.get("/metrics").text
        bad = {"clip_vitb32_image": features["clip_vitb32_image"]}
        assert c.post("/items", json={"item_id": "NEW-2", "features": bad}).status_code == 422
    with make_client(bundle_dir) as c:  # a restart restores it from Redis
        again = c.get("/items/NEW-1")
        assert again.status_code == 200
        assert again.json()["semantic_id"] == added["semantic_id"]
        assert c.get("/items/UNKNOWN").status_code == 404


def test_stale_stored_ids_are_looked_up_once_per_sync(
    bundle_dir: Path, clean_redis: redis.Redis
) -> None:
    """A stored id found nowhere (an item a new bundle dropped) costs one Redis lookup until
    the next item sync, not one per request."""
    ids = item_ids()

    def lookups() -> int:
        return int(clean_redis.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))

    with make_client(bundle_dir, items_sync_s=3600) as c:
        clean_redis.lpush(history_key("u"), ids[3], "GONE", ids[17])
        before = lookups()
        for _ in range(3):
            r = c.post("/recommend", json={"user_id": "u"})
            assert r.status_code == 200
            assert r.json()["history_length"] == 2
        assert lookups() - before == 1
        assert 'bbqrec_unknown_items_total{source="store"} 3.0' in c.get("/metrics").text


def test_replicas_share_the_items_added_at_serving_time(
    bundle_dir: Path, clean_redis: None
) -> None:
    ds = load_dataset()
    ids = ds.item_ids
    history = [ids[3], ids[17], ids[42]]
    with (
        make_client(bundle_dir, items_sync_s=0.1) as a,
        make_client(bundle_dir) as b,
        make_client(bundle_dir, items_sync_s=3600) as cold,
    ):
        features = look_alike(a, history)
        added = a.post("/items", json={"item_id": "NEW-A", "features": features}).json()
        # Replica b has not synced yet (1 s), but a request naming the item finds it at once.
        event = {"events": [{"user_id": "u", "item_id": "NEW-A"}]}
        assert b.post("/events", json=event).status_code == 200
        assert b.get("/items/NEW-A").json()["semantic_id"] == added["semantic_id"]
        # a's reply was lost and the client retried on a replica that does not know the item
        # yet: it answers with a's item and writes nothing; other features for the id conflict
        again = cold.post("/items", json={"item_id": "NEW-A", "features": features})
        assert again.status_code == 200, again.text
        assert again.json() == added
        other = {m: [-x for x in v] for m, v in features.items()}
        assert cold.post("/items", json={"item_id": "NEW-A", "features": other}).status_code == 409
        # Look-alike items added on both replicas: one SID prefix, never one SID.
        sids = {tuple(added["semantic_id"])}
        for client, item in ((b, "NEW-B"), (a, "NEW-C"), (b, "NEW-D")):
            r = client.post("/items", json={"item_id": item, "features": features})
            assert r.status_code == 201, r.text
            sids.add(tuple(r.json()["semantic_id"]))
        assert len(sids) == 4
        assert len({sid[:-1] for sid in sids}) == 1
        # ... and the periodic sync brings each replica the items the other added without a
        # request naming them (a: NEW-B, NEW-D; b: NEW-C, after NEW-A by lookup): then both hold
        # one catalogue and rank alike.
        deadline = time.monotonic() + 10
        while not all("bbqrec_items_synced_total 2.0" in c.get("/metrics").text for c in (a, b)):
            assert time.monotonic() < deadline, "the replicas never synced"
            time.sleep(0.1)
        ranked = [
            {
                i["item_id"]: i["score"]
                for i in c.post(
                    "/recommend", json={"user_id": "x", "history": history, "k": 100}
                ).json()["items"]
            }
            for c in (a, b)
        ]
        assert ranked[0].keys() == ranked[1].keys()
        assert all(abs(ranked[0][i] - ranked[1][i]) < 1e-5 for i in ranked[0])


def test_readiness_reports_redis_down(bundle_dir: Path) -> None:
    with make_client(bundle_dir, redis_url="redis://127.0.0.1:1/0") as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["redis"] is False
        assert body["bundle_loaded"] is True
        assert c.get("/healthz").status_code == 200
        assert (
            c.post(
                "/events", json={"events": [{"user_id": "u", "item_id": item_ids()[0]}]}
            ).status_code
            == 503
        )


def test_ready_with_the_actual_provider(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {
        "ready": True,
        "bundle_loaded": True,
        "provider_requested": "cpu",
        "provider_actual": "CPUExecutionProvider",
        "redis": True,
    }


def test_write_routes_need_the_api_key(bundle_dir: Path, clean_redis: None) -> None:
    event = {"events": [{"user_id": "u", "item_id": item_ids()[0]}]}
    with make_client(bundle_dir, api_key="s3cret") as c:
        assert c.post("/events", json=event).status_code == 401
        assert c.post("/events", json=event, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/events", json=event, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/recommend", json={"user_id": "u"}).status_code == 200  # reads are open


def test_oversized_bodies_are_refused(bundle_dir: Path, clean_redis: None) -> None:
    with make_client(bundle_dir, max_body_bytes=2048) as c:
        big = {"events": [{"user_id": "u" * 100, "item_id": item_ids()[0]}] * 40}
        assert c.post("/events", json=big).status_code == 413


def test_metrics_use_route_templates_not_ids(client: TestClient) -> None:
    client.get("/users/some-user-id/history")
    client.get("/items/no-such-item")
    text = client.get("/metrics").text
    assert 'route="/users/{user_id}/history"' in text
    assert "some-user-id" not in text
    assert (
        'bbqrec_http_requests_total{method="GET",route="/items/{item_id}",status="404"} 1.0' in text
    )
    for name in (
        "bbqrec_http_request_duration_seconds",
        "bbqrec_batch_size",
        "bbqrec_inference_seconds",
        "bbqrec_queue_wait_seconds",
        "bbqrec_model_info",
    ):
        assert name in text


def test_embedded_redis_persists_events(bundle_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(bundle_path=bundle_dir, data_dir=data)
    event = {"events": [{"user_id": "e", "item_id": item_ids()[7]}]}
    with TestClient(create_app(settings)) as c:
        assert c.post("/events", json=event).status_code == 200
        assert servers_in(data)
    assert servers_in(data) == []  # the app's shutdown stopped its server
    with TestClient(create_app(settings)) as c:
        assert c.get("/users/e/history").json()["items"] == [item_ids()[7]]
    assert servers_in(data) == []


def test_settings_refuse_a_bad_deployment(tmp_path: Path, bundle_dir: Path) -> None:
    with pytest.raises(ValueError, match="not an exported bundle"):
        Settings(bundle_path=tmp_path)
    with pytest.raises(ValueError, match="redis_url must start"):
        Settings(bundle_path=bundle_dir, redis_url="http://x")
    assert np.isfinite(Settings(bundle_path=bundle_dir).redis_timeout_s)


def test_exclude_seen_covers_the_whole_stored_history(client: TestClient) -> None:
    ids = item_ids()
    seen = [ids[i] for i in range(100, 130)]  # 30 items: more than the model's 20-item window
    events = [{"user_id": "long", "item_id": i} for i in seen]
    assert client.post("/events", json={"events": events}).status_code == 200
    body = client.post("/recommend", json={"user_id": "long", "k": 100}).json()
    assert len(body["items"]) == 100
    assert not {i["item_id"] for i in body["items"]} & set(seen)


def test_a_retried_events_request_with_an_idempotency_key_is_written_once(
    client: TestClient,
) -> None:
    ids = item_ids()
    body = {"events": [{"user_id": "r", "item_id": ids[i]} for i in (5, 1)]}
    key = {"Idempotency-Key": "3f1c-retry-me"}
    first = client.post("/events", json=body, headers=key)
    assert first.json() == {"accepted": 2, "replayed": False}
    again = client.post("/events", json=body, headers=key)  # e.g. after a lost reply
    assert again.status_code == 200
    assert again.json() == {"accepted": 2, "replayed": True}
    assert client.get("/users/r/history").json()["items"] == [ids[5], ids[1]]
    other = {"events": [{"user_id": "r", "item_id": ids[9]}]}
    r = client.post("/events", json=other, headers=key)
    assert r.status_code == 422
    assert "used with other events; nothing was written" in r.json()["detail"]["reason"]
    for bad in ("has space", "", "x" * 256):
        r = client.post("/events", json=other, headers={"Idempotency-Key": bad})
        assert r.status_code == 422, bad
    assert client.get("/users/r/history").json()["items"] == [ids[5], ids[1]]
    # without a key a repeat is another interaction
    client.post("/events", json=body)
    assert client.get("/users/r/history").json()["items"] == [ids[5], ids[1], ids[5], ids[1]]


def test_events_keep_request_order_unless_all_are_timestamped(client: TestClient) -> None:
    ids = item_ids()
    plain = [{"user_id": "o", "item_id": ids[i]} for i in (5, 1, 9)]
    client.post("/events", json={"events": plain})
    assert client.get("/users/o/history").json()["items"] == [ids[5], ids[1], ids[9]]
    stamped = [
        {"user_id": "t", "item_id": ids[i], "timestamp": ts}
        for i, ts in ((5, 30.0), (1, 10.0), (9, 20.0))
    ]
    client.post("/events", json={"events": stamped})
    assert client.get("/users/t/history").json()["items"] == [ids[1], ids[9], ids[5]]
