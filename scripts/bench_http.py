"""HTTP benchmark of the service with wrk on loopback (issue 6 figures in docs/BENCHMARKS.md).

    python scripts/bench_http.py --bundle runs/bundles/beauty-bench [--duration 15] [--beam N]
        [--workers N] [--concurrent-batches N]

Starts `bbqrec serve` on the bundle (`--workers` processes, default 1; Redis database 13 of the
local server, flushed), stores real histories (the last 20 training items of the dataset's first
users) through POST /events, then, in one run:
- `GET /healthz` (the no-model route: the framework's ceiling), `POST /recommend` (k = 10,
  stored history) and `POST /events` (one event), closed loop at 1, 8 and 64 connections;
- `POST /recommend` paced at half of its best closed-loop RPS (each connection pauses between
  requests), for the p99 at half load.
Prints a markdown table; the mean micro-batch size comes from the service's own /metrics.
Needs `wrk` (Debian package `wrk`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from soak import rss_bytes  # scripts/soak.py, beside this file

from service.manifest import read_manifest
from training.data import leave_one_out, load_dataset

LUA = Path(__file__).with_name("bench_http.lua")


@dataclass(frozen=True)
class Run:
    route: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float | None
    paced: bool = False


def wait_ready(base: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{base} not ready after {timeout_s:.0f} s")


def batch_totals(base: str) -> tuple[float, float]:
    """(sum, count) of the service's batch-size histogram."""
    text = httpx.get(f"{base}/metrics", timeout=5).text
    values = {}
    for name in ("bbqrec_batch_size_sum", "bbqrec_batch_size_count"):
        m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        values[name] = float(m.group(1)) if m else 0.0
    return values["bbqrec_batch_size_sum"], values["bbqrec_batch_size_count"]


def wrk(
    base: str, mode: str, connections: int, duration: int, env: dict[str, str], delay_ms: float = 0
) -> dict[str, float]:
    threads = min(2, connections)
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "-s", str(LUA), base]
    run_env = {**env, "BENCH_MODE": mode, "BENCH_DELAY_MS": f"{delay_ms:.3f}"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=run_env, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    result: dict[str, float] = json.loads(line[len("BENCH ") :])
    return result


def measure(
    base: str, mode: str, connections: int, duration: int, env: dict[str, str], delay_ms: float = 0
) -> Run:
    before = batch_totals(base)
    r = wrk(base, mode, connections, duration, env, delay_ms)
    after = batch_totals(base)
    batches = after[1] - before[1]
    return Run(
        route={"healthz": "GET /healthz", "recommend": "POST /recommend", "events": "POST /events"}[
            mode
        ],
        connections=connections,
        rps=r["requests"] / (r["duration_us"] / 1e6),
        p50_ms=r["p50_us"] / 1e3,
        p99_ms=r["p99_us"] / 1e3,
        errors=int(r["errors"]),
        mean_batch=(after[0] - before[0]) / batches if batches else None,
        paced=delay_ms > 0,
    )


def seed_histories(base: str, bundle: Path, users: int) -> int:
    """Store real histories (last 20 training items) for `users` users as bench-1..bench-N."""
    manifest = read_manifest(bundle)
    dataset = load_dataset(Path(manifest["dataset"]["path"]))
    train = leave_one_out(dataset, 20).train
    events = [
        {"user_id": f"bench-{u + 1}", "item_id": dataset.item_ids[i]}
        for u, seq in enumerate(train[:users])
        for i in seq[-20:]
    ]
    with httpx.Client(base_url=base, timeout=30) as client:
        for start in range(0, len(events), 1000):
            client.post("/events", json={"events": events[start : start + 1000]}).raise_for_status()
    return min(users, len(train))


def markdown(runs: list[Run]) -> str:
    rows = [
        "| route | connections | RPS | p50 ms | p99 ms | errors | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        conns = f"{r.connections} (paced)" if r.paced else str(r.connections)
        batch = f"{r.mean_batch:.1f}" if r.mean_batch is not None else ""
        rows.append(
            f"| {r.route} | {conns} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.errors} | {batch} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--duration", type=int, default=15, help="Seconds per measurement.")
    parser.add_argument("--connections", default="1,8,64")
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1, help="bbqrec serve --workers")
    parser.add_argument("--beam", type=int, help="BBQREC_BEAM (default: the bundle's)")
    parser.add_argument(
        "--concurrent-batches", type=int, help="BBQREC_CONCURRENT_BATCHES (default: the service's)"
    )
    parser.add_argument(
        "--skip", default="", help="Comma-separated routes not to measure: healthz, events"
    )
    parser.add_argument("--out", type=Path, help="Also write the runs as JSON here.")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    base = f"http://127.0.0.1:{args.port}"
    redis.Redis.from_url(args.redis_url).flushdb()
    serve = ["serve", "--bundle", str(args.bundle), "--port", str(args.port)]
    serve += ["--workers", str(args.workers)]
    server_env = {**os.environ} | ({"BBQREC_BEAM": str(args.beam)} if args.beam else {})
    if args.concurrent_batches:
        server_env["BBQREC_CONCURRENT_BATCHES"] = str(args.concurrent_batches)
    server = subprocess.Popen(
        [sys.executable, "-m", "training.cli", *serve, "--redis-url", args.redis_url],
        env=server_env,
    )
    skip = set(filter(None, args.skip.split(",")))
    try:
        wait_ready(base)
        users = seed_histories(base, args.bundle, args.users)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as items:
            items.write((args.bundle / "item_ids.txt").read_text())
        env = {**os.environ, "BENCH_USERS": str(users), "BENCH_ITEMS": items.name}
        conns = [int(c) for c in args.connections.split(",")]
        # warm-up: first requests pay for lazy initialisation
        wrk(base, "recommend", 8, 3, env)
        closed = [m for m in ("healthz", "recommend") if m not in skip]
        runs = [measure(base, m, c, args.duration, env) for m in closed for c in conns]
        best = max(r.rps for r in runs if r.route == "POST /recommend")
        half, c = best / 2, 8
        # pace 8 connections to half of the best RPS: each waits `delay` between requests;
        # two short calibration runs correct the delay for the latency at that load
        delay = c * 1000 / half
        for _ in range(2):
            probe = wrk(base, "recommend", c, 5, env, delay_ms=delay)
            rps = probe["requests"] / (probe["duration_us"] / 1e6)
            latency_ms = c * 1000 / rps - delay
            delay = max(c * 1000 / half - latency_ms, 0.0)
        runs.append(measure(base, "recommend", c, args.duration, env, delay_ms=delay))
        if "events" not in skip:
            runs += [measure(base, "events", c, args.duration, env) for c in conns]
        rss_mib = rss_bytes(server.pid, children=True) / 2**20
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(markdown(runs))
    print(f"\nhalf of best /recommend RPS: {half:.0f}; server RSS at the end: {rss_mib:.0f} MiB")
    if args.out:
        args.out.write_text(json.dumps([r.__dict__ for r in runs], indent=2))


if __name__ == "__main__":
    main()
