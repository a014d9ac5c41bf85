"""The bundle manifest: format version, file hashes, and the checks a loader makes before it
trusts a bundle. Standard library only, so training (export) and serving (load) share it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

# 2: the beam width is a graph input of recommender.onnx (1 had it fixed at export)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """The bundle is missing, incomplete, corrupt or of another format."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, after checking that every listed file is present and unchanged."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; not a bundle directory")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{manifest_path}: invalid JSON ({e.msg})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format version {manifest.get('format_version')!r}, this loader "
            f"reads {FORMAT_VERSION}; re-export the run with this version's `bbqrec export`"
        )
    for name, digest in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: listed in the manifest but missing")
        if sha256(file) != digest:
            raise BundleError(f"{file}: sha256 does not match the manifest (corrupt or replaced)")
    for required in ("recommender.onnx", "quantizer.onnx", "sids.npy", "item_ids.txt"):
        if required not in manifest.get("files", {}):
            raise BundleError(f"{manifest_path}: incomplete bundle, {required} not listed")
    if not re.fullmatch(r"[0-9a-f]{16,64}", sid_space(manifest)):
        raise BundleError(f"{manifest_path}: sid_space must be 16 to 64 lowercase hex digits")
    return manifest


def sid_space(manifest: dict[str, Any]) -> str:
    """What a bundle's SIDs mean: one space per trained tokenizer (its codebooks and SID
    table). Bundles of one tokenizer share it, so an item added under one keeps its SID under
    the other; bundles of different tokenizers never do. Exports without the field: the hash of
    their SID table and quantizer."""
    if (space := manifest.get("sid_space")) is not None:
        return str(space)
    files = manifest["files"]
    return space_of(files["sids.npy"], files[manifest["quantizer"]["file"]])


def space_of(*digests: str) -> str:
    """A SID space from the sha256 of the files that define it."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
