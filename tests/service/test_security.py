"""Authentication and secrets: the API key guards writes and admin (reads when configured), is
compared in constant time, and never shows up in logs, answers or metrics; neither do request
bodies. Real Redis (database 15)."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import REDIS_URL

KEY = "k3y-0f-the-s3rvice-7c1f9a"
MARKER = "BODY-MARKER-5b8e"  # stands for private content in a request body


def app_client(bundle: Path, **overrides: Any) -> TestClient:
    defaults: dict[str, Any] = {"redis_url": REDIS_URL, "api_key": SecretStr(KEY)}
    settings = Settings(bundle_path=bundle, **(defaults | overrides))
    return TestClient(create_app(settings))


def item(bundle: Path, i: int = 0) -> str:
    return (bundle / "item_ids.txt").read_text().split()[i]


def writes(bundle: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("/events", {"events": [{"user_id": "u", "item_id": item(bundle)}]}),
        ("/items", {"item_id": "N", "features": {}}),
        ("/admin/reload", {}),
    ]


@pytest.mark.usefixtures("clean_redis")
def test_writes_and_admin_need_the_key(exported: tuple[Path, Path]) -> None:
    bundle = exported[1]
    near_misses = ["", KEY[:-1], KEY + "x", KEY[:-1] + "X", KEY.upper(), "é" + KEY]
    with app_client(bundle) as c:
        for path, body in writes(bundle):
            r = c.post(path, json=body)
            assert r.status_code == 401, path
            assert r.json()["detail"]["reason"] == "missing or wrong X-API-Key"
            for wrong in near_misses:
                # bytes: a header may carry any Latin-1 text, "é" included
                r = c.post(path, json=body, headers={b"X-API-Key": wrong.encode("latin-1")})
                assert r.status_code == 401, (path, wrong)
                assert KEY not in r.text
        assert redis.Redis.from_url(REDIS_URL).dbsize() == 0  # nothing got through
        ok = {"X-API-Key": KEY}
        assert c.post("/events", json=writes(bundle)[0][1], headers=ok).status_code == 200
        assert c.post("/admin/reload", headers=ok).status_code == 200
        # reads are open unless configured otherwise
        assert c.post("/recommend", json={"user_id": "u"}).status_code == 200
        assert c.get("/users/u/history").status_code == 200


@pytest.mark.usefixtures("clean_redis")
def test_protected_reads(exported: tuple[Path, Path]) -> None:
    bundle = exported[1]
    reads: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/recommend", {"json": {"user_id": "u"}}),
        ("GET", f"/items/{item(bundle)}", {}),
        ("GET", "/users/u/history", {}),
        ("GET", "/model", {}),
    ]
    with app_client(bundle, protect_reads=True) as c:
        for method, path, kwargs in reads:
            assert c.request(method, path, **kwargs).status_code == 401, path
            ok = c.request(method, path, headers={"X-API-Key": KEY}, **kwargs)
            assert ok.status_code == 200, path
        # probes and the scraper stay open: they carry no data about users
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200, path


@pytest.mark.usefixtures("clean_redis")
def test_the_key_is_compared_in_constant_time(
    exported: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with app_client(exported[1]) as c:
        c.post("/events", json=writes(exported[1])[0][1], headers={"X-API-Key": "wrong"})
    assert compared == [(b"wrong", KEY.encode())]


@pytest.mark.usefixtures("clean_redis")
def test_no_secret_or_body_in_logs_answers_or_metrics(
    exported: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = exported[1]
    secret_headers = {"X-API-Key": KEY}
    event = {"events": [{"user_id": MARKER, "item_id": item(bundle)}]}
    caplog.set_level(logging.DEBUG)  # every logger, every level
    texts: list[str] = []
    with app_client(bundle) as c:
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/events", {"json": event}),
            ("POST", "/events", {"json": {"events": [{"user_id": MARKER, "item_id": MARKER}]}}),
            ("POST", "/recommend", {"json": {"user_id": MARKER, "k": 0}}),
            ("POST", "/recommend", {"json": {"user_id": MARKER, "history": [MARKER]}}),
            ("POST", "/recommend", {"json": {"user_id": MARKER}}),
            ("POST", "/items", {"json": {"item_id": MARKER, "features": {"x": [1.0]}}}),
            ("POST", "/admin/reload", {"json": {"bundle_path": str(tmp_path / "none")}}),
            ("POST", "/admin/reload", {}),
            ("GET", f"/users/{MARKER}/history", {}),
            ("GET", "/model", {}),
            ("GET", "/openapi.json", {}),
        ]
        for method, path, kwargs in requests:
            r = c.request(method, path, headers=secret_headers, **kwargs)
            assert r.status_code < 500, (path, r.text)
            texts.append(r.text)
        metrics = c.get("/metrics").text
    # Redis down: the error paths log too
    with app_client(bundle, redis_url="redis://127.0.0.1:1/0") as c:
        r = c.post("/events", json=event, headers=secret_headers)
        assert r.status_code == 503
        texts.append(r.text)
    # the service's records (and the libraries it drives), not the test client's own request log
    records = [r for r in caplog.records if not r.name.startswith("httpx")]
    assert any(r.name.startswith("bbqrec") for r in records), "nothing logged: proves nothing"
    logged = "".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    assert KEY not in logged
    assert MARKER not in logged
    assert all(KEY not in t for t in texts)
    assert KEY not in metrics
    assert MARKER not in metrics


def test_settings_never_print_the_key(exported: tuple[Path, Path]) -> None:
    settings = Settings(bundle_path=exported[1], api_key=SecretStr(KEY))
    assert KEY not in repr(settings)
    assert KEY not in str(settings.model_dump())
