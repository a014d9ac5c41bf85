"""Known vulnerabilities in the installed Python environment, from the package index's advisories.

    python scripts/audit_deps.py [--strict] [--json OUT]

`pip-audit` asks the index's JSON API once per installed *version*; where only the per-project
endpoint answers (as on the machines this project is built on), it can audit nothing. This script
asks the per-version endpoint first and falls back to the per-project one, whose advisories are
those of the project's latest release: valid for an installed version only when it is that
release. A package neither endpoint covers is reported as not audited, by name, with the reason.

Exit status: 1 when an installed version has a known, not withdrawn vulnerability (or, with
`--strict`, when any package could not be audited); 2 when the index could not be reached at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from pip._internal.models.index import PyPI  # the index pip itself installs from by default

PROJECT = "bbqrec-serve"  # this repository (an editable install), not a dependency
TIMEOUT_S = 30.0


@dataclass
class Audit:
    name: str
    version: str
    source: str = ""  # "version" | "latest" (which endpoint's advisories apply) | "" (none)
    vulnerabilities: list[dict[str, Any]] = field(default_factory=list)
    not_audited: str = ""  # why, when no endpoint covers this version


def fetch(url: str) -> dict[str, Any] | None:
    """The JSON at `url`, or None for a 404. Other failures raise."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def public(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': a local build of a release has the release's advisories."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version


def audit(name: str, version: str, api: str) -> Audit:
    result = Audit(name, version)
    release = public(version)
    data = fetch(f"{api}/{name}/{release}/json")
    if data is not None:
        result.source = "version"
    else:
        data = fetch(f"{api}/{name}/json")
        if data is None:
            result.not_audited = "not on the index (a local or private package?)"
            return result
        latest = str(data["info"]["version"])
        if public(latest) != release:
            result.not_audited = (
                f"installed {version}, the index's latest is {latest}, and the per-version "
                "endpoint did not answer"
            )
            return result
        result.source = "latest"
    result.vulnerabilities = [
        {k: v.get(k) for k in ("id", "aliases", "fixed_in", "summary", "link")}
        for v in data.get("vulnerabilities") or []
        if not v.get("withdrawn")
    ]
    return result


def installed() -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name != PROJECT:
            seen[name] = dist.version
    return sorted(seen.items())


def report(audits: Iterable[Audit]) -> tuple[list[Audit], list[Audit]]:
    audits = list(audits)
    found = [a for a in audits if a.vulnerabilities]
    skipped = [a for a in audits if a.not_audited]
    covered = len(audits) - len(skipped)
    by = {s: sum(a.source == s for a in audits) for s in ("version", "latest")}
    print(
        f"{len(audits)} installed packages: {covered} audited ({by['version']} by their "
        f"version's advisories, {by['latest']} as the latest release), {len(skipped)} not audited"
    )
    for a in found:
        for v in a.vulnerabilities:
            fixed = ", ".join(v["fixed_in"] or []) or "no fix listed"
            print(f"VULNERABLE {a.name} {a.version}: {v['id']} (fixed in {fixed}) {v['summary']}")
    for a in skipped:
        print(f"not audited: {a.name} {a.version}: {a.not_audited}")
    print(f"{len(found)} packages with known vulnerabilities")
    return found, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="fail on a package not audited")
    parser.add_argument("--json", type=Path, help="write every package's result here")
    args = parser.parse_args()
    packages = installed()
    try:
        with ThreadPoolExecutor(8) as pool:
            audits = list(pool.map(lambda p: audit(p[0], p[1], PyPI.pypi_url), packages))
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        print(f"the package index's JSON API could not be reached: {e}", file=sys.stderr)
        return 2
    found, skipped = report(audits)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(a) for a in audits], indent=1))
    return 1 if found or (args.strict and skipped) else 0


if __name__ == "__main__":
    sys.exit(main())
