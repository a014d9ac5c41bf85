"""`bbqrec serve --workers 2`, for real: two uvicorn worker processes behind one port, sharing the
embedded Redis the parent starts and one Prometheus metrics directory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.redis_procs import free_port, servers_in
from training.data import load_dataset

KEY = "test-key"
HEADERS = {"X-API-Key": KEY}
MODALITIES = ("clip_vitb32_image", "clip_vitb32_text")
MODEL_INFO = re.compile(r'^bbqrec_model_info\{pid="(\d+)"', re.MULTILINE)


@pytest.fixture
def workers(exported: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BBQREC_", "PROMETHEUS_"))}
    env |= {"BBQREC_API_KEY": KEY, "BBQREC_DATA_DIR": str(tmp_path / "data")}
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "training.cli", "serve", "--bundle", str(exported[1])),
            *("--port", str(port), "--workers", "2"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # ready when both workers have loaded the model and report it
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if len(set(MODEL_INFO.findall(httpx.get(f"{base}/metrics").text))) == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("two workers never came up")
        yield base
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            for pid in servers_in(tmp_path / "data"):  # what the killed parent could not stop
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(
                "serve did not stop within 60 s of SIGINT: "
                + (tmp_path / "serve.log").read_text()[-3000:]
            ) from None
        finally:
            log.close()
    assert servers_in(tmp_path / "data") == []  # the embedded Redis stopped with the service


def test_workers_share_redis_items_and_metrics(workers: str) -> None:
    ds = load_dataset()
    ids = ds.item_ids
    with httpx.Client(base_url=workers, headers=HEADERS) as c:
        for n in range(30):  # spread over both workers by the kernel
            event = {"events": [{"user_id": "u", "item_id": ids[n]}]}
            assert c.post("/events", json=event).status_code == 200
        # every worker reads the one embedded Redis
        for _ in range(6):
            assert c.get("/users/u/history").json()["items"] == list(ids[:30])
        features = {
            m: ds.features[m][7].tolist() for m in ("clip_vitb32_image", "clip_vitb32_text")
        }
        added = c.post("/items", json={"item_id": "NEW-W", "features": features})
        assert added.status_code == 201, added.text
        for _ in range(6):  # whichever worker answers knows the new item
            assert c.get("/items/NEW-W").json()["semantic_id"] == added.json()["semantic_id"]
        # a reload would swap one worker's bundle: refused, with the reason
        reload = c.post("/admin/reload")
        assert reload.status_code == 409
        assert "2 worker processes" in reload.json()["detail"]["reason"]
        # /metrics on any worker counts the requests of both
        metrics = c.get("/metrics").text
        events = re.search(
            r'^bbqrec_http_requests_total\{method="POST",route="/events",status="200"\} (\S+)$',
            metrics,
            re.MULTILINE,
        )
        assert events is not None
        assert float(events.group(1)) == 30.0
        assert len(set(MODEL_INFO.findall(metrics))) == 2
