"""The checksum manifest of an export, and its verification."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "pma_manifest.json"
FORMAT = "pma_dist-export"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, info: dict, known: dict[str, dict] | None = None) -> None:
    """Record size and sha256 of every file under ``directory`` plus ``info``; written last.

    ``known`` holds entries the writers computed while writing, so large files are not read
    again; every other file is hashed here.
    """
    known = known or {}
    files = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_file() and name != MANIFEST:
            files[name] = known.get(name) or {
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
    manifest = {"format": FORMAT, "version": 1, **info, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a (complete) pma_dist export")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_files(directory: Path) -> list[str]:
    """Problems found comparing ``directory`` with its manifest (empty when it matches)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    listed = manifest["files"]
    for name, expected in listed.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(
                f"{name}: {path.stat().st_size} bytes, manifest says {expected['bytes']}"
            )
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (corrupted)")
    for path in directory.rglob("*"):
        name = str(path.relative_to(directory))
        if path.is_file() and name != MANIFEST and name not in listed:
            problems.append(f"{name}: not in the manifest")
    return problems
