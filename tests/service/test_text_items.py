"""POST /items with raw text: the bundle's text encoder embeds it as training did."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.bundle import Bundle
from service.manifest import MANIFEST
from service.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture
def client(text_exported: tuple[Path, Path]) -> Iterator[TestClient]:
    db = redis.Redis.from_url(REDIS_URL)
    db.flushdb()
    settings = Settings(bundle_path=text_exported[1], redis_url=REDIS_URL)
    with TestClient(create_app(settings)) as c:
        yield c
    db.flushdb()


def test_raw_text_gets_the_sid_of_its_embedding(
    client: TestClient, text_exported: tuple[Path, Path]
) -> None:
    text = "glass beaker 5"
    r = client.post("/items", json={"item_id": "new-beaker", "text": text})
    assert r.status_code == 201, r.text
    bundle = Bundle(text_exported[1])
    assert bundle.text is not None
    codes, _ = bundle.quantize({"text": bundle.text.embed([text])})
    assert r.json()["semantic_id"][:-1] == codes[0].tolist()
    assert client.get("/items/new-beaker").json()["added_at_serving_time"]
    # recommendable at once: it is in the catalogue the next search sees
    ranked = client.post("/recommend", json={"user_id": "u", "history": ["new-beaker"], "k": 5})
    assert ranked.status_code == 200, ranked.text


def test_text_and_a_text_vector_together_are_refused(client: TestClient) -> None:
    vector = np.ones(384, dtype=np.float32).tolist()
    r = client.post("/items", json={"item_id": "x", "text": "a", "features": {"text": vector}})
    assert r.status_code == 422
    assert "either text or features.text" in r.json()["detail"]["reason"]
    assert client.get("/items/x").status_code == 404


def test_text_for_a_bundle_without_text_encoder_is_refused(
    exported: tuple[Path, Path],
) -> None:
    db = redis.Redis.from_url(REDIS_URL)
    db.flushdb()
    with TestClient(create_app(Settings(bundle_path=exported[1], redis_url=REDIS_URL))) as c:
        r = c.post("/items", json={"item_id": "x", "text": "a beaker"})
    db.flushdb()
    assert r.status_code == 422
    assert "no text encoder" in r.json()["detail"]["reason"]


def test_a_text_item_is_embedded_again_under_another_tokenizer(
    client: TestClient, text_exported: tuple[Path, Path], tmp_path: Path
) -> None:
    """The item's text is kept: a bundle of another tokenizer embeds and quantizes it again.
    Here that bundle is the same export under another SID space, so the codes must match."""
    other = tmp_path / "other"
    shutil.copytree(text_exported[1], other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["sid_space"] = "0123456789abcdef"
    (other / MANIFEST).write_text(json.dumps(manifest))
    text = "glass beaker 5"  # (a SID prefix with room: the codebooks have 4 codes)
    added = client.post("/items", json={"item_id": "new-goggles", "text": text})
    assert added.status_code == 201, added.text
    first = added.json()
    with TestClient(create_app(Settings(bundle_path=other, redis_url=REDIS_URL))) as replica:
        r = replica.get("/items/new-goggles")
        assert r.status_code == 200, r.text
        item = r.json()
        assert item["semantic_id"][:-1] == first["semantic_id"][:-1]
        assert "bbqrec_items_requantized_total 1.0" in replica.get("/metrics").text
