"""Durable file-system steps shared by saved state and exports."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to stable storage (a directory: the renames in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes) -> None:
    """``path`` holds ``data``, all or nothing, on stable storage: written aside, fsynced,
    renamed over it, and the rename fsynced."""
    temp = path.with_suffix(".tmp")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_path(path.parent)
