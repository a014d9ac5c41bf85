"""The history store's contract, against one real Redis server (127.0.0.1:6379, database 15; CI
starts one) and against a real three-node Redis Cluster started for this module."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from service.store import (
    IdempotencyConflictError,
    ItemExistsError,
    RedisHistoryStore,
    StoreUnavailableError,
    history_key,
    idempotency_key_name,
)
from tests.service.redis_procs import HOST, free_port, redis_cluster

pytestmark = pytest.mark.anyio

SERVER_URL = "redis://127.0.0.1:6379/15"
# Users whose ids stress the hash tag: braces inside, unicode, a colon.
ODD_USERS = ("a}b{c", "{x", "}", "ünï", "user:42")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as ports:
        yield ports


@pytest.fixture(params=["server", "cluster"])
async def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RedisHistoryStore]:
    if request.param == "server":
        flush = [redis.Redis.from_url(SERVER_URL)]
        store = RedisHistoryStore.from_url(SERVER_URL, capacity=5, timeout_s=2.0)
    else:
        ports: list[int] = request.getfixturevalue("cluster_ports")
        flush = [redis.Redis(host=HOST, port=p) for p in ports]
        store = RedisHistoryStore.from_url(
            f"redis://{HOST}:{ports[0]}", capacity=5, timeout_s=2.0, cluster=True
        )
    for client in flush:
        client.flushdb()
    yield store
    await store.close()
    for client in flush:
        client.flushdb()
        client.close()


def test_a_users_key_hashes_to_the_users_slot() -> None:
    # The hash tag: the slot of a plain id's history key is the slot of the id itself.
    for user in ("u1", "alice", "42"):
        assert key_slot(history_key(user).encode()) == key_slot(user.encode())
    # Keys stay distinct whatever the id holds (the hash tag only picks the slot).
    keys = {history_key(u) for u in (*ODD_USERS, "a", "x")}
    assert len(keys) == len(ODD_USERS) + 2


async def test_histories_are_capped_lists_oldest_first(store: RedisHistoryStore) -> None:
    await store.append([("u", f"i{n}") for n in range(3)])
    await store.append([("u", f"i{n}") for n in range(3, 8)])
    assert await store.history("u") == ["i3", "i4", "i5", "i6", "i7"]  # capacity 5
    assert await store.history("nobody") == []


async def test_a_batch_over_many_users_keeps_each_users_order(store: RedisHistoryStore) -> None:
    users = [f"user-{n}" for n in range(40)] + list(ODD_USERS)
    events = [(u, f"{u}/{n}") for n in range(3) for u in users]  # interleaved across users
    if isinstance(store.client, RedisCluster):
        assert len(store._transactions(users)) > 1  # the batch really spans slots here
    await store.append(events)
    for user in users:
        assert await store.history(user) == [f"{user}/{n}" for n in range(3)]


async def test_an_idempotency_key_writes_its_events_once(store: RedisHistoryStore) -> None:
    users = [f"user-{n}" for n in range(12)]
    events = [(u, f"{u}/{n}") for n in range(2) for u in users]
    assert not await store.append(events, idempotency_key="req-1", ttl_s=60)
    assert await store.append(events, idempotency_key="req-1", ttl_s=60)  # a retry: replayed
    for user in users:
        assert await store.history(user) == [f"{user}/0", f"{user}/1"]
    with pytest.raises(IdempotencyConflictError):
        await store.append([(users[0], "other")], idempotency_key="req-1", ttl_s=60)
    assert not await store.append(events[:1], idempotency_key="req-2", ttl_s=60)
    assert not await store.append(events[:1])  # no key: a second interaction
    assert await store.history(users[0]) == ["user-0/0", "user-0/1", "user-0/0", "user-0/0"]
    # the key is kept in each slot written, and forgotten after its time to live
    for group in store._transactions(users):
        assert 0 < await store.client.ttl(idempotency_key_name(group[0], "req-1")) <= 60


async def test_a_retry_after_a_partial_cluster_write_writes_the_rest(
    store: RedisHistoryStore,
) -> None:
    """On a cluster a batch is one transaction per slot and the key is kept per slot: a retry
    after some slots were written writes exactly the others. On one server a batch is all or
    nothing, so there is no partial write to retry."""
    users = [f"user-{n}" for n in range(12)]
    events = [(u, f"{u}/{n}") for n in range(2) for u in users]
    groups = store._transactions(users)
    if not isinstance(store.client, RedisCluster):
        assert len(groups) == 1
        return
    assert len(groups) > 1
    first = set(groups[0])  # what a write that failed after its first slot committed
    assert not await store.append([e for e in events if e[0] in first], idempotency_key="k")
    assert not await store.append(events, idempotency_key="k")  # the client's retry
    for user in users:
        assert await store.history(user) == [f"{user}/0", f"{user}/1"]


A, B = "a" * 16, "b" * 16  # two SID spaces (two tokenizers)
SOURCE = {"text": "a beaker", "vectors": {}}


async def test_added_items_claim_distinct_sids_and_are_logged(store: RedisHistoryStore) -> None:
    view = [[1, 2, 3]]
    first = await store.add_item("NEW-1", A, SOURCE, [1, 2, 3], [0, 2], 5, view)
    assert first["codes"] == {"sid": [1, 2, 3, 1], "view_codes": view}  # 0 and 2: the bundle's
    assert first["source"] == SOURCE
    assert first["seq"] == 1
    second = await store.add_item("NEW-2", A, SOURCE, [1, 2, 3], [0, 2], 5, view)
    assert second["codes"]["sid"] == [1, 2, 3, 3]
    assert second["seq"] == 2
    third = await store.add_item("NEW-3", A, SOURCE, [7, 7, 7], [], 5, view)
    assert third["codes"]["sid"] == [7, 7, 7, 0]
    with pytest.raises(ItemExistsError):
        await store.add_item("NEW-1", A, SOURCE, [9, 9, 9], [], 5, view)
    await store.add_item("NEW-4", A, SOURCE, [1, 2, 3], [0, 2], 5, view)
    with pytest.raises(ValueError, match="already holds 5 items"):
        await store.add_item("NEW-5", A, SOURCE, [1, 2, 3], [0, 2], 5, view)
    cursor, records = await store.items_since(0, A)
    assert cursor == 4
    assert list(records) == ["NEW-1", "NEW-2", "NEW-3", "NEW-4"]
    assert records["NEW-2"] == second
    assert await store.items_since(4, A) == (4, {})
    assert list((await store.items_since(2, A))[1]) == ["NEW-3", "NEW-4"]
    assert await store.items_by_id(["NEW-2", "unknown"], A) == {"NEW-2": second}


async def test_sids_are_kept_per_space_and_claimed_once_in_each(store: RedisHistoryStore) -> None:
    # Under another tokenizer (space B) the items have no codes until a replica claims them.
    for n in range(2):
        await store.add_item(f"NEW-{n}", A, SOURCE, [1, 2, 3], [], 5, [[1, 2, 3]])
    _, records = await store.items_since(0, B)
    assert [r["codes"] for r in records.values()] == [None, None]
    assert records["NEW-0"]["source"] == SOURCE
    # B's own items use extras 0 and 1 under the prefix; A's claims do not matter there.
    claimed = await store.claim_sid("NEW-1", B, [1, 2, 3], [0, 1], 5, [[4]])
    assert claimed == {"sid": [1, 2, 3, 2], "view_codes": [[4]]}
    # Two replicas racing on one item: the first claim wins, the second gets the same codes.
    again = await asyncio.gather(
        *(store.claim_sid("NEW-0", B, [1, 2, 3], [0, 1], 5, [[4]]) for _ in range(2))
    )
    assert again[0] == again[1] == {"sid": [1, 2, 3, 3], "view_codes": [[4]]}
    assert (await store.items_by_id(["NEW-1"], B))["NEW-1"]["codes"] == claimed
    assert (await store.items_by_id(["NEW-1"], A))["NEW-1"]["codes"]["sid"] == [1, 2, 3, 1]
    with pytest.raises(KeyError):
        await store.claim_sid("never-added", B, [1, 2, 3], [], 5, [[4]])
    with pytest.raises(ValueError, match="already holds"):
        await store.add_item("NEW-2", B, SOURCE, [1, 2, 3], [0, 1, 4], 5, [[4]])
    # Nothing written by the refused add: not logged, and no SID taken.
    assert await store.items_by_id(["NEW-2"], B) == {}


async def test_concurrent_adds_under_one_prefix_never_share_a_sid(
    store: RedisHistoryStore,
) -> None:
    # What two replicas adding look-alike items at once do: each claim is one atomic script.
    added = await asyncio.gather(
        *(store.add_item(f"item-{n}", A, SOURCE, [4, 5], [0], 64, [[0]]) for n in range(40))
    )
    sids = [tuple(record["codes"]["sid"]) for record in added]
    assert len(set(sids)) == 40
    assert (4, 5, 0) not in sids
    assert sorted(record["seq"] for record in added) == list(range(1, 41))


async def test_ping(store: RedisHistoryStore) -> None:
    assert await store.ping()


async def test_one_transaction_per_slot_on_a_cluster_and_one_on_a_server(
    store: RedisHistoryStore,
) -> None:
    users = [f"u{n}" for n in range(50)]
    groups = store._transactions(users)
    assert sorted(u for g in groups for u in g) == sorted(users)
    if isinstance(store.client, RedisCluster):
        for group in groups:
            assert len({key_slot(history_key(u).encode()) for u in group}) == 1
        assert len(groups) == len({key_slot(u.encode()) for u in users})
    else:
        assert groups == [users]  # all or nothing on one server


@pytest.mark.parametrize("cluster", [False, True])
async def test_an_unreachable_redis_fails_fast_with_store_unavailable(cluster: bool) -> None:
    store = RedisHistoryStore.from_url(
        f"redis://{HOST}:{free_port()}", capacity=5, timeout_s=0.5, cluster=cluster
    )
    start = time.perf_counter()
    assert not await store.ping()
    with pytest.raises(StoreUnavailableError):
        await store.history("u")
    with pytest.raises(StoreUnavailableError) as failed:
        await store.append([("u", "i")])
    assert failed.value.committed == ()
    assert time.perf_counter() - start < 3 * 0.5 + 2.0  # three budgets and a margin
    await store.close()
