"""The SLO gate on crafted locust CSVs, and one short real headless locust run of the traffic mix
against a live `bbqrec serve` (tiny exported bundle, real Redis database 15)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis

from tests.deploy.helpers import DEPLOY, ROOT, load_script

REDIS_URL = "redis://127.0.0.1:6379/15"
RUN_SLO = DEPLOY / "loadtest/run_slo.py"
HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
    "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
    "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
)


@pytest.fixture(scope="module")
def slo() -> ModuleType:
    return load_script(RUN_SLO)


def stats_csv(tmp_path: Path, rows: list[tuple[str, str, int, int, str]]) -> Path:
    """A locust stats CSV with (type, name, requests, failures, p99) rows, Aggregated last."""
    lines = [HEADER]
    for kind, name, requests, failures, p99 in rows:
        p50 = "N/A" if p99 == "N/A" else "5"
        pct = ",".join([p50, "6", "7", "8", "9", "10", "11", p99, p99, p99, p99])
        lines.append(f"{kind},{name},{requests},{failures},5,5.5,1,30,14,100.0,0.0,{pct}")
    path = tmp_path / "run_stats.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gate_passes_a_run_within_the_objective(slo: ModuleType, tmp_path: Path) -> None:
    path = stats_csv(
        tmp_path,
        [
            ("POST", "/recommend", 900, 0, "40"),
            ("POST", "/events", 100, 1, "60"),
            ("", "Aggregated", 1000, 1, "45"),
        ],
    )
    verdict = slo.gate(path, p99_ms=50, max_error_rate=0.001)
    assert verdict.ok, verdict.violations
    assert [r.name for r in verdict.rows] == ["/recommend", "/events", "Aggregated"]
    assert slo.main(["gate", str(path), "--p99-ms", "50", "--max-error-rate", "0.001"]) == 0


@pytest.mark.parametrize(
    ("requests", "failures", "p99", "missed"),
    [
        (1000, 0, "51", "p99 51.0 ms > 50"),
        (1000, 2, "45", "error rate 0.2000% > 0.1000%"),
        (0, 0, "N/A", "no requests were made"),
    ],
)
def test_gate_fails_a_run_that_misses_it(
    slo: ModuleType, tmp_path: Path, requests: int, failures: int, p99: str, missed: str
) -> None:
    path = stats_csv(tmp_path, [("", "Aggregated", requests, failures, p99)])
    verdict = slo.gate(path, p99_ms=50, max_error_rate=0.001)
    assert not verdict.ok
    assert any(v.startswith(missed) for v in verdict.violations), verdict.violations
    assert slo.main(["gate", str(path), "--p99-ms", "50", "--max-error-rate", "0.001"]) == 1


def test_gate_refuses_a_file_that_is_not_locust_stats(slo: ModuleType, tmp_path: Path) -> None:
    path = stats_csv(tmp_path, [("POST", "/recommend", 10, 0, "4")])  # no Aggregated row
    with pytest.raises(ValueError, match="Aggregated"):
        slo.gate(path, p99_ms=50, max_error_rate=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def live_service(exported: tuple[Path, Path]) -> Iterator[str]:
    """`bbqrec serve` on a free loopback port against Redis database 15, until ready."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    port = free_port()
    bbqrec = Path(sys.executable).parent / "bbqrec"
    command = [str(bbqrec), "serve", "--bundle", str(exported[1]), "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--redis-url", REDIS_URL],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
                assert time.monotonic() < deadline, "the service did not become ready in 60 s"
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        client.flushdb()
        client.close()


def test_a_real_headless_run_of_the_mix_meets_a_loose_objective(
    live_service: str, slo: ModuleType, tmp_path: Path
) -> None:
    prefix = tmp_path / "mix"
    command = [sys.executable, str(RUN_SLO), "run", "--host", live_service, "--users", "4"]
    command += ["--spawn-rate", "4", "--run-time", "6s", "--csv", str(prefix)]
    result = subprocess.run(
        [*command, "--p99-ms", "5000", "--max-error-rate", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "SLO met" in result.stdout
    rows = {r.name: r for r in slo.read_stats(Path(f"{prefix}_stats.csv"))}
    for name in ("/recommend (stored history)", "/recommend (explicit history)", "/events"):
        assert rows[name].requests > 0, name
        assert rows[name].failures == 0, name
    # The same run against an objective it cannot meet is refused.
    impossible = slo.gate(Path(f"{prefix}_stats.csv"), p99_ms=0.001, max_error_rate=0.0)
    assert not impossible.ok
