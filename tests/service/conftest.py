"""Shared by the service tests: the real Redis they talk to (CI starts one) and a clean database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

REDIS_URL = "redis://127.0.0.1:6379/15"
# Redis budget for tests of something other than latency: on a loaded 2-core CI machine a busy
# request can outlast the default budget and be answered degraded or 503 (the budget itself is
# tested in test_faults.py).
UNHURRIED_REDIS_S = 5.0


@pytest.fixture
def clean_redis() -> Iterator[redis.Redis]:
    """Database 15, empty before and after the test."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
