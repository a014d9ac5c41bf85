"""Soak: a long load at half of the measured capacity against a live `bbqrec serve`.

    python scripts/soak.py --bundle runs/bundles/scientific_mm --minutes 10 \\
        --redis-url redis://127.0.0.1:6379/14 --out runs/soak/soak.json

Starts the server (`python -m training.cli serve`, an API key set), seeds user histories, then

1. capacity: a closed loop on `--connections` keep-alive connections for `--capacity-s`
   seconds: the most requests per second server and client reach together on this machine;
2. soak: an open loop at `--load` (default 0.5) of that rate for `--minutes`. Latency is
   measured from when a request was *due*, not when a connection was free, so a server that
   falls behind shows it (no coordinated omission).

The mix: 80 % /recommend from the stored history, 10 % /recommend with an explicit history,
10 % /events (one event; histories are capped, so Redis stays bounded). Reports errors, p50 and
p99 per minute, and the server's RSS at the start and end of the soak (growth must stay under
10 %); then checks the server's own log for the API key and for request bodies. Exits 1 when
a goal is missed. Standard library only, with its own small HTTP/1.1 client: a heavier client
would take the CPU the server needs on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
RSS_GROWTH_LIMIT = 0.10


def rss_bytes(pid: int, *, children: bool = False) -> int:
    """Resident memory of a process; with `children`, plus that of its direct children (the
    worker processes of `bbqrec serve --workers N`)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) * 1024
            break
    else:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    if children:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_bytes(int(child))
    return total


class Connection:
    """One keep-alive HTTP/1.1 connection; responses must carry Content-Length (uvicorn's do)."""

    def __init__(self, port: int, api_key: str) -> None:
        self.port, self.api_key = port, api_key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nX-API-Key: {self.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        try:
            self.writer.write(head.encode() + body)
            status_line = await self.reader.readline()
            status = int(status_line.split()[1])
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return status, await self.reader.readexactly(length)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Mix:
    users: list[str]
    items: list[str]
    history: int
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def next(self) -> tuple[str, bytes]:
        r = self.rng.random()
        if r < 0.8:
            body = {"user_id": self.rng.choice(self.users), "k": 10}
            return "/recommend", json.dumps(body).encode()
        if r < 0.9:
            history = self.rng.sample(self.items, self.history)
            body = {"user_id": "explicit", "k": 10, "history": history}
            return "/recommend", json.dumps(body).encode()
        event = {"user_id": self.rng.choice(self.users), "item_id": self.rng.choice(self.items)}
        return "/events", json.dumps({"events": [event]}).encode()


@dataclass
class Minute:
    minute: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    rss_mib: float
    load_1m: float  # the machine's load average: other work on the same cores shows here
    error_statuses: dict[str, int]  # "0" = no answer (connection error)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def capacity(port: int, key: str, mix: Mix, connections: int, seconds: float) -> float:
    """Closed loop: every connection sends its next request as soon as the last one answers."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        conn = Connection(port, key)
        while time.perf_counter() < deadline:
            path, body = mix.next()
            status, _ = await conn.request("POST", path, body)
            done += status == 200
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(connections)))
    return done / (time.perf_counter() - start)


async def soak(
    port: int, key: str, mix: Mix, pid: int, rate: float, minutes: int, connections: int
) -> tuple[list[Minute], list[str]]:
    """Open loop at `rate` requests per second; one `Minute` per minute."""
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[list[float]] = [[] for _ in range(minutes)]
    errors: list[Counter[str]] = [Counter() for _ in range(minutes)]
    samples: list[str] = []  # the first few error answers, for the report
    start = time.perf_counter()
    end = start + 60 * minutes

    async def producer() -> None:
        n = 0
        while (t := start + n / rate) < end:
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            due.put_nowait(t)
            n += 1
        for _ in range(connections):
            due.put_nowait(None)

    async def worker() -> None:
        conn = Connection(port, key)
        while (t := await due.get()) is not None:
            path, body = mix.next()
            try:
                status, answer = await conn.request("POST", path, body)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
                status, answer = 0, repr(e).encode()
            m = min(minutes - 1, int((t - start) // 60))
            latencies[m].append(time.perf_counter() - t)
            if status != 200:
                errors[m][str(status)] += 1
                if len(samples) < 5:
                    samples.append(f"{path} {status} {answer[:200]!r}")
        await conn.close()

    result: list[Minute] = []

    async def monitor() -> None:
        for m in range(minutes):
            await asyncio.sleep(max(0.0, start + 60 * (m + 1) - time.perf_counter()))
            ms = [x * 1000 for x in latencies[m]]
            row = Minute(
                m + 1,
                len(ms),
                sum(errors[m].values()),
                round(percentile(ms, 0.5), 2),
                round(percentile(ms, 0.99), 2),
                round(rss_bytes(pid) / 2**20, 1),
                round(os.getloadavg()[0], 2),
                dict(errors[m]),
            )
            result.append(row)
            print(json.dumps(asdict(row)), flush=True)

    await asyncio.gather(producer(), monitor(), *(worker() for _ in range(connections)))
    return result, samples


async def wait_ready(port: int, key: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = Connection(port, key)
        try:
            status, _ = await conn.request("GET", "/readyz")
            if status == 200:
                return
        except OSError:
            pass
        finally:
            await conn.close()
        await asyncio.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s} s")


async def run(
    args: argparse.Namespace, server: subprocess.Popen[bytes], key: str
) -> dict[str, Any]:
    await wait_ready(args.port, key, timeout_s=180)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    items = (args.bundle / "item_ids.txt").read_text().split()
    users = [f"soak-{i}" for i in range(args.users)]
    rng = random.Random(1)
    seed = Connection(args.port, key)
    for chunk in range(0, len(users), 100):
        events = [
            {"user_id": u, "item_id": rng.choice(items)}
            for u in users[chunk : chunk + 100]
            for _ in range(10)
        ]
        status, body = await seed.request(
            "POST", "/events", json.dumps({"events": events}).encode()
        )
        if status != 200:
            raise RuntimeError(f"seeding failed: {status} {body[:200]!r}")
    await seed.close()
    mix = Mix(users, items, history=min(10, int(manifest["max_history"])))

    rps_max = await capacity(args.port, key, mix, args.connections, args.capacity_s)
    rate = args.load * rps_max
    print(f"capacity {rps_max:.0f} req/s; soak at {rate:.0f} req/s", flush=True)
    rss_start = rss_bytes(server.pid)
    minutes, samples = await soak(
        args.port, key, mix, server.pid, rate, args.minutes, args.connections
    )
    rss_end = rss_bytes(server.pid)
    p99s = [m.p99_ms for m in minutes]
    return {
        "bundle": str(args.bundle),
        "model_version": manifest["model_version"],
        "redis_url": args.redis_url,
        "capacity_rps": round(rps_max, 1),
        "target_rps": round(rate, 1),
        "connections": args.connections,
        "requests": sum(m.requests for m in minutes),
        "errors": sum(m.errors for m in minutes),
        "error_samples": samples,
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_end / rss_start - 1, 4),
        "p99_ms_median_minute": statistics.median(p99s),
        "p99_ms_worst_minute": max(p99s),
        "minutes": [asdict(m) for m in minutes],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--capacity-s", type=float, default=20.0)
    parser.add_argument("--load", type=float, default=0.5, help="fraction of capacity")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/soak/soak.json"))
    args = parser.parse_args()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".server.log")
    key = secrets.token_hex(16)
    env = os.environ | {"BBQREC_API_KEY": key}
    command = [sys.executable, "-m", "training.cli", "serve", "--bundle", str(args.bundle)]
    command += ["--port", str(args.port), "--redis-url", args.redis_url]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            report = asyncio.run(run(args, server, key))
        finally:
            server.terminate()
            server.wait(timeout=30)
    server_log = log_path.read_text(errors="replace")
    report["server_log_has_api_key"] = key in server_log
    report["server_log_has_request_body"] = '"user_id"' in server_log
    report["command"] = " ".join(sys.argv)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "minutes"}, indent=2))
    ok = (
        report["errors"] == 0
        and report["rss_growth"] < RSS_GROWTH_LIMIT
        and not report["server_log_has_api_key"]
        and not report["server_log_has_request_body"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
