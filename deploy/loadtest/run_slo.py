"""Run the locust mix headless against a running service for a bounded time, keep its CSV, and
gate on a service-level objective: p99 latency and error rate over all requests.

    python deploy/loadtest/run_slo.py run --host http://127.0.0.1:8000 --users 16 \\
        --run-time 60s --csv runs/loadtest/local --p99-ms 50 --max-error-rate 0.001
    python deploy/loadtest/run_slo.py gate runs/loadtest/local_stats.csv \\
        --p99-ms 50 --max-error-rate 0.001

Exit status: 0 when the objective is met, 1 when it is missed (or nothing was measured), 2 when
locust itself failed. Standard library only (locust runs as a subprocess).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
AGGREGATED = "Aggregated"


@dataclass(frozen=True)
class Row:
    """One line of locust's `*_stats.csv` (latencies in milliseconds, as locust writes them)."""

    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Verdict:
    rows: list[Row]  # per request name, then the aggregate last
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations


def _percentile(value: str) -> float | None:
    return None if value in ("", "N/A") else float(value)


def read_stats(path: Path) -> list[Row]:
    """The rows of a locust stats CSV; the `Aggregated` row last."""
    with path.open(newline="") as f:
        rows = [
            Row(
                name=r["Name"] if r["Type"] else AGGREGATED,
                requests=int(r["Request Count"]),
                failures=int(r["Failure Count"]),
                rps=float(r["Requests/s"]),
                p50_ms=_percentile(r["50%"]),
                p99_ms=_percentile(r["99%"]),
            )
            for r in csv.DictReader(f)
        ]
    if not rows or rows[-1].name != AGGREGATED:
        raise ValueError(f"{path}: not a locust stats CSV (no final Aggregated row)")
    return rows


def gate(path: Path, *, p99_ms: float, max_error_rate: float) -> Verdict:
    """Check the aggregate of a run against the objective; no requests at all is a miss."""
    rows = read_stats(path)
    total = rows[-1]
    violations = []
    if total.requests == 0:
        violations.append("no requests were made")
    else:
        if total.p99_ms is None or total.p99_ms > p99_ms:
            violations.append(f"p99 {total.p99_ms} ms > {p99_ms} ms")
        if total.error_rate > max_error_rate:
            violations.append(f"error rate {total.error_rate:.4%} > {max_error_rate:.4%}")
    return Verdict(rows, violations)


def report(verdict: Verdict) -> str:
    lines = [f"{'name':<34} {'requests':>9} {'failures':>9} {'RPS':>8} {'p50 ms':>7} {'p99 ms':>7}"]
    for r in verdict.rows:
        p50 = "-" if r.p50_ms is None else f"{r.p50_ms:g}"
        p99 = "-" if r.p99_ms is None else f"{r.p99_ms:g}"
        lines.append(
            f"{r.name:<34} {r.requests:>9} {r.failures:>9} {r.rps:>8.1f} {p50:>7} {p99:>7}"
        )
    lines.append("SLO met" if verdict.ok else "SLO missed: " + "; ".join(verdict.violations))
    return "\n".join(lines)


def run_locust(
    *, host: str, users: int, spawn_rate: float, run_time: str, csv_prefix: Path, locustfile: Path
) -> int:
    """Locust headless for a bounded time; its own exit code ignores failures (we gate)."""
    csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "--host",
        host,
        "--users",
        str(users),
        "--spawn-rate",
        str(spawn_rate),
        "--run-time",
        run_time,
        "--stop-timeout",
        "10",
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--exit-code-on-error",
        "0",
    ]
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run locust headless, then gate on its CSV")
    run.add_argument("--host", required=True, help="the service's base URL")
    run.add_argument("--users", type=int, default=16)
    run.add_argument("--spawn-rate", type=float, default=16.0)
    run.add_argument("--run-time", default="60s", help="locust duration, e.g. 30s, 2m")
    run.add_argument("--csv", type=Path, default=Path("runs/loadtest/run"), help="CSV prefix")
    run.add_argument("--locustfile", type=Path, default=LOCUSTFILE)
    check = sub.add_parser("gate", help="gate on an existing locust *_stats.csv")
    check.add_argument("stats", type=Path)
    for p in (run, check):
        p.add_argument("--p99-ms", type=float, required=True, help="p99 latency bound")
        p.add_argument(
            "--max-error-rate", type=float, required=True, help="failed / all, e.g. 0.001"
        )
    args = parser.parse_args(argv)

    if args.command == "run":
        code = run_locust(
            host=args.host,
            users=args.users,
            spawn_rate=args.spawn_rate,
            run_time=args.run_time,
            csv_prefix=args.csv,
            locustfile=args.locustfile,
        )
        stats = Path(f"{args.csv}_stats.csv")
        if code != 0 or not stats.is_file():
            print(f"locust failed (exit {code}); no {stats}", file=sys.stderr)
            return 2
    else:
        stats = args.stats
    verdict = gate(stats, p99_ms=args.p99_ms, max_error_rate=args.max_error_rate)
    print(report(verdict))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
