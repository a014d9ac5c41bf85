"""The service on a real three-node Redis Cluster (`BBQREC_REDIS_CLUSTER=true`): settings,
events then recommendations across slots, items kept across a restart, and a batch that a dead
node cuts in two."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from redis.crc import key_slot

from service.app import create_app
from service.settings import Settings
from service.store import history_key
from tests.service.redis_procs import HOST, redis_cluster


@pytest.fixture
def bundle_dir(exported: tuple[Path, Path]) -> Path:
    return exported[1]


@pytest.fixture(scope="module")
def cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as ports:
        yield ports


def cluster_client(bundle_dir: Path, ports: list[int], budget_s: float = 2.0) -> TestClient:
    """The default budget is generous: a busy machine must not make a live cluster look dead."""
    settings = Settings(
        bundle_path=bundle_dir,
        redis_url=f"redis://{HOST}:{ports[0]}",
        redis_cluster=True,
        redis_timeout_s=budget_s,
    )
    return TestClient(create_app(settings))


@pytest.fixture
def client(bundle_dir: Path, cluster_ports: list[int]) -> Iterator[TestClient]:
    nodes = [redis.Redis(host=HOST, port=p) for p in cluster_ports]
    for node in nodes:
        node.flushdb()
    with cluster_client(bundle_dir, cluster_ports) as c:
        yield c
    for node in nodes:
        node.flushdb()
        node.close()


def item_ids(bundle_dir: Path) -> list[str]:
    return (bundle_dir / "item_ids.txt").read_text().split()


def test_cluster_settings(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BBQREC_REDIS_CLUSTER", "true")
    monkeypatch.setenv("BBQREC_REDIS_URL", "redis://10.0.0.7:7000")
    assert Settings(bundle_path=bundle_dir).redis_cluster
    for url, reason in (
        (None, "needs a redis://"),
        ("unix:///run/redis.sock", "needs a redis://"),
        ("redis://10.0.0.7:7000/3", "only database 0"),
    ):
        with pytest.raises(ValueError, match=reason):
            Settings(bundle_path=bundle_dir, redis_url=url)


def test_events_then_recommend_across_slots(
    client: TestClient, bundle_dir: Path, cluster_ports: list[int]
) -> None:
    ids = item_ids(bundle_dir)
    users = [f"cluster-user-{n}" for n in range(30)]
    events = [
        {"user_id": u, "item_id": ids[n * 7 + j]} for n, u in enumerate(users) for j in (0, 1)
    ]
    r = client.post("/events", json={"events": events})
    assert r.status_code == 200
    assert r.json() == {"accepted": 60, "replayed": False}
    # the users' keys are spread over the nodes, each user's on one node
    holding = [redis.Redis(host=HOST, port=p).dbsize() for p in cluster_ports]
    assert sum(holding) == len(users)
    assert sum(n > 0 for n in holding) >= 2
    for n, user in enumerate(users):
        history = client.get(f"/users/{user}/history").json()["items"]
        assert history == [ids[7 * n], ids[7 * n + 1]]
    body = client.post("/recommend", json={"user_id": users[4], "k": 20}).json()
    assert not body["cold_start"]
    assert body["history_length"] == 2
    assert not {i["item_id"] for i in body["items"]} & {ids[28], ids[29]}
    assert client.get("/readyz").json()["redis"] is True


def test_new_items_survive_a_restart_on_a_cluster(
    client: TestClient, bundle_dir: Path, cluster_ports: list[int]
) -> None:
    modalities = client.get("/model").json()["modalities"]
    rng = np.random.default_rng(0)
    features = {m["name"]: rng.normal(size=m["dim"]).tolist() for m in modalities}
    r = client.post("/items", json={"item_id": "CLUSTER-NEW", "features": features})
    assert r.status_code == 201, r.text
    with cluster_client(bundle_dir, cluster_ports) as again:
        restored = again.get("/items/CLUSTER-NEW")
        assert restored.status_code == 200
        assert restored.json()["semantic_id"] == r.json()["semantic_id"]


def test_a_dead_node_cuts_a_batch_at_a_slot_boundary(bundle_dir: Path, tmp_path: Path) -> None:
    """A MULTI may only touch one slot, so on a cluster a batch is one transaction per slot.
    With a node down part-way, /events answers 503 and names the users it did write."""
    ids = item_ids(bundle_dir)
    # The default budget (2 s): a refused connection fails fast (here the batch took 0.09 s);
    # 0.5 s made the read of the live node's history time out on a loaded machine.
    with redis_cluster(tmp_path) as ports, cluster_client(bundle_dir, ports) as c:
        with redis.Redis(host=HOST, port=ports[0]) as node:
            slots = node.execute_command("CLUSTER", "SLOTS")  # [[first, last, [host, port..]]..]
        owner = {
            user: port
            for user in map(str, range(200))
            for first, last, (_, port, *_) in slots
            if first <= key_slot(history_key(user).encode()) <= last
        }
        alive = next(u for u, port in owner.items() if port == ports[0])
        doomed = next(u for u, port in owner.items() if port == ports[1])
        redis.Redis(host=HOST, port=ports[1]).shutdown(nosave=True)

        batch = [{"user_id": alive, "item_id": ids[0]}, {"user_id": doomed, "item_id": ids[1]}]
        r = c.post("/events", json={"events": batch})
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert r.json()["detail"]["committed_users"] == [alive]
        assert c.get(f"/users/{alive}/history").json()["items"] == [ids[0]]
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["redis"] is False
