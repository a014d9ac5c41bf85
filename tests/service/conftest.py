"""Shared by the service tests: the real Redis they talk to (CI starts one) and a clean database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
def clean_redis() -> Iterator[redis.Redis]:
    """Database 15, empty before and after the test."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
