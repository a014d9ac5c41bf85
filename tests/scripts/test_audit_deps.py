"""scripts/audit_deps.py against a local HTTP server that answers like the index's JSON API."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "audit_deps.py"
VULN = {
    "id": "PYSEC-0000-1",
    "aliases": ["CVE-0000-1"],
    "fixed_in": ["1.0.1"],
    "summary": "a crafted advisory",
    "link": "https://example.invalid/PYSEC-0000-1",
    "withdrawn": None,
}
# path -> JSON body; anything else is a 404
PAGES: dict[str, dict[str, Any]] = {
    "/pypi/vulnerable/1.0.0/json": {"info": {"version": "1.0.0"}, "vulnerabilities": [VULN]},
    "/pypi/withdrawn/2.0/json": {
        "info": {"version": "2.0"},
        "vulnerabilities": [VULN | {"withdrawn": "2024-01-01T00:00:00"}],
    },
    # only the per-project endpoint answers for these two
    "/pypi/latest/json": {"info": {"version": "3.1"}, "vulnerabilities": [VULN]},
    "/pypi/older/json": {"info": {"version": "5.0"}, "vulnerabilities": []},
}


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit_deps", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Index(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        page = PAGES.get(self.path)
        body = json.dumps(page).encode() if page else b'{"message": "Not Found"}'
        self.send_response(200 if page else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pypi"
    server.shutdown()
    server.server_close()


def test_each_endpoint_and_each_verdict(api: str) -> None:
    audit = load_script().audit
    found = audit("vulnerable", "1.0.0", api)
    assert found.source == "version"
    assert [v["id"] for v in found.vulnerabilities] == ["PYSEC-0000-1"]
    assert audit("withdrawn", "2.0", api).vulnerabilities == []
    # the per-project endpoint's advisories apply to its latest release only
    latest = audit("latest", "3.1+cpu", api)  # a local build of the release
    assert latest.source == "latest"
    assert len(latest.vulnerabilities) == 1
    older = audit("older", "4.0", api)
    assert older.source == ""
    assert "latest is 5.0" in older.not_audited
    assert "not on the index" in audit("unknown", "1.0", api).not_audited


def test_report_counts_findings_and_gaps(api: str, capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    audits = [script.audit(n, v, api) for n, v in (("vulnerable", "1.0.0"), ("older", "4.0"))]
    found, skipped = script.report(audits)
    assert [a.name for a in found] == ["vulnerable"]
    assert [a.name for a in skipped] == ["older"]
    out = capsys.readouterr().out
    assert "VULNERABLE vulnerable 1.0.0: PYSEC-0000-1 (fixed in 1.0.1)" in out
    assert "not audited: older 4.0" in out
