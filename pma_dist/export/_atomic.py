"""Write a directory so that it appears whole or not at all.

Files go into a hidden temporary sibling of the target; each is fsynced as it is written. At
commit a checksum manifest is written last, the temporary directory is fsynced and renamed onto
the target. An existing export at the target is moved aside only then, and deleted after the
rename, so a crash at any point leaves either the old export or the new one under the target
name (and, in the narrow window between the two renames, the old one beside it as
``.NAME.pma-old-*``). A directory without a manifest is never an export.

:func:`commit_collectively` runs that protocol across ranks: every rank writes its part, the
first rank seals and commits, and every rank learns the outcome.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from .. import _comm as comm
from .._io import fsync_path
from ._manifest import MANIFEST, write_manifest

Body = Callable[[Path], dict]
"""Writes one rank's part into the temporary directory; returns ``{"error": ..., "files": ...}``."""

TEMP_MARK = ".pma-tmp-"
OLD_MARK = ".pma-old-"


class ExportError(RuntimeError):
    """An export could not be written; any existing export at the target is unchanged."""


def check_target(target: Path) -> None:
    """Refuse targets an export must not replace: a file, an unrelated non-empty directory, or
    a place this process cannot write."""
    if target.is_file() or target.is_symlink() and not target.is_dir():
        raise ExportError(f"export path {target} is a file; give a directory path")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ExportError(
            f"export path {target} is a non-empty directory that is not a pma_dist export "
            f"(no {MANIFEST}); choose another path or remove it"
        )
    parent = target.parent
    if not parent.is_dir():
        raise ExportError(f"export path {target}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"export path {target}: parent directory {parent} is not writable")


def make_temp_dir(target: Path) -> Path:
    """A fresh hidden sibling of ``target``; leftovers of crashed exports to it are removed."""
    for stale in target.parent.glob(f".{target.name}{TEMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)
    temp = target.parent / f".{target.name}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
    temp.mkdir()
    return temp


def ensure_space(directory: Path, needed: int) -> None:
    """Fail before writing when the file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ExportError(
            f"not enough disk space in {directory}: {needed:,} bytes needed, {free:,} free"
        )


def describe_os_error(err: OSError, path: Path) -> ExportError:
    """An ``ExportError`` that says what went wrong writing ``path`` in words."""
    if err.errno == errno.ENOSPC:
        return ExportError(f"disk full while writing {path}")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExportError(f"no permission to write {path}: {err.strerror}")
    return ExportError(f"could not write {path}: {err}")


def commit(temp: Path, target: Path, info: dict, known: dict[str, dict] | None = None) -> None:
    """Seal ``temp`` with a manifest and move it onto ``target`` (see the module docstring).

    ``known``: manifest entries (bytes, sha256) of files already hashed by their writers.
    """
    write_manifest(temp, info, known)
    for path in temp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(temp)
    old = None
    if target.exists():
        check_target(target)
        old = target.parent / f".{target.name}{OLD_MARK}{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
    os.rename(temp, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def abort(temp: Path | None) -> None:
    """Remove a temporary directory after a failed export."""
    if temp is not None:
        shutil.rmtree(temp, ignore_errors=True)


def commit_collectively(
    target: Path,
    body: Body,
    seal: Callable[[Path], None] | None,
    info: dict,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Run ``body`` on every rank of ``group`` into a temporary directory, then ``seal`` and
    commit it on its first rank. Any failure on any rank raises ``ExportError`` on every rank
    and removes the temporary directory; an existing export at ``target`` is untouched until
    the commit."""
    target = target.absolute()
    rank = comm.rank(group)
    temp, error = None, None
    if rank == 0:
        try:
            check_target(target)
            temp = make_temp_dir(target)
        except (ExportError, OSError) as err:
            error = str(err)
    temp_name, error = comm.broadcast_object((str(temp) if temp else None, error), group=group)
    if error:
        raise ExportError(error)
    temp = Path(temp_name)
    try:
        reports = comm.gather_to_first(body(temp), group=group)
        error = None
        if rank == 0:
            error = _seal_and_commit(reports, temp, target, info, seal)
        error = comm.broadcast_object(error, group=group)
        if error:
            raise ExportError(error)
    except BaseException:
        if rank == 0:
            abort(temp)
        raise
    return target


def _seal_and_commit(
    reports: list[dict], temp: Path, target: Path, info: dict, seal: Callable[[Path], None] | None
) -> str | None:
    """On the first rank: commit the export the ranks' ``reports`` describe, or say why not."""
    errors = [r["error"] for r in reports if r.get("error")]
    if errors:
        return f"export to {target} failed: {errors[0]}"
    known = {name: entry for r in reports for name, entry in r.get("files", {}).items()}
    try:
        if seal is not None:
            seal(temp)
        commit(temp, target, info, known)
    except Exception as err:  # noqa: BLE001 - every rank must hear of it, not wait for it
        reason = err if isinstance(err, (ExportError, OSError)) else f"{type(err).__name__}: {err}"
        return f"export to {target} failed while sealing it: {reason}"
    return None
