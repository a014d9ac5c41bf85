"""Print the requirements of one pyproject extra, one per line, for `pip install -r`.

The Dockerfile installs dependencies from `pyproject.toml` alone, before the source is copied, so
a source change does not invalidate the dependency layer. Standard library only: it runs in the
bare base image.

    python requirements.py pyproject.toml serve     # the [serve] extra plus the core dependencies
    python requirements.py pyproject.toml dev locust  # only the named packages of an extra
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement (`uvicorn[standard]>=0.30` -> uvicorn)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def requirements(pyproject: Path, extra: str, only: list[str]) -> list[str]:
    """The core dependencies and the extra's (or, with `only`, just those packages of the extra)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    if extra not in extras:
        raise SystemExit(f"{pyproject}: no extra {extra!r} (have {', '.join(sorted(extras))})")
    if not only:
        return [*project["dependencies"], *extras[extra]]
    wanted = {requirement_name(name) for name in only}
    picked = [r for r in extras[extra] if requirement_name(r) in wanted]
    missing = wanted - {requirement_name(r) for r in picked}
    if missing:
        raise SystemExit(f"{pyproject}: extra {extra!r} lacks {', '.join(sorted(missing))}")
    return picked


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(Path(argv[0]), argv[1], argv[2:])))


if __name__ == "__main__":
    main(sys.argv[1:])
