"""The reader of the ``pma_rank*.pt`` per-rank state files that earlier releases wrote (saves
now go through ``_indexed``).

Each rank's slot tensors are described by the ``Fragment``s that say which parameter elements
each one holds, so a state saved under one layout (DeepSpeed ZeRO-2 on 8 ranks, say) loads under
another (ZeRO-3 on 16, FSDP2 on 4): the files' fragments are read as saved runs
(``_runs.SavedRuns``), which must cover every element this rank needs
before anything changes.

``.pt`` files are plain data (dicts, lists, numbers, strings and tensors) loaded with
``torch.load(weights_only=True)``: a file that needs anything else is refused, so a crafted file
cannot run code on the ranks that resume from it. The tensors and the header each carry a
checksum, so a torn or edited file is refused too. Reading them touches every rank's file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import PMAStateError
from ._checksum import bit_checksum
from ._format import StateHeader, check_version
from ._runs import Copy

FORMAT = "pma_dist-fragments"
FILE_GLOB = "pma_rank*.pt"


def header_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of everything in a file but the slot tensors (whose checksums it includes)."""
    header = {k: v for k, v in payload.items() if k not in ("slots", "header_sha256")}
    text = json.dumps(header, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def read_rank_file(path: Path) -> dict[str, Any]:
    """One rank's file, memory-mapped, loaded as plain data only and checked."""
    try:
        payload = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise PMAStateError(
            f"{path}: refused: the file holds objects other than tensors and plain data, which "
            f"pma_dist never unpickles (a crafted file could run code); {str(err)[:300]}"
        ) from None
    except Exception as err:  # noqa: BLE001 - truncated or corrupted files fail in many ways
        raise PMAStateError(f"{path}: PMA state file does not load ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PMAStateError(f"{path}: not a pma_dist state file")
    version = check_version(payload.get("version"), str(path))
    if version > 1 and payload.get("header_sha256") != header_digest(payload):
        raise PMAStateError(f"{path}: the header does not match its checksum (corrupted)")
    return payload


def file_header(payload: dict[str, Any], where: str) -> StateHeader:
    """The state header of a rank file of either format (format 1 split it in two)."""
    if payload["version"] == 1:
        return StateHeader.from_flat({"meta": payload["meta"], **payload["counters"]}, where)
    return StateHeader.from_flat(payload["header"], where)


def read_rank_files(directory: Path) -> list[dict[str, Any]]:
    """Every rank's file, memory-mapped; checks that the set is complete."""
    paths = sorted(Path(directory).glob(FILE_GLOB))
    if not paths:
        raise PMAStateError(
            f"{directory}: no pma_index.json nor {FILE_GLOB} files (no PMA state saved here)"
        )
    files = [read_rank_file(p) for p in paths]
    for path, f in zip(paths, files):
        for k, (slot, sums) in enumerate(zip(f["slots"], f["checksums"])):
            for i, (tensor, expected) in enumerate(zip(slot, sums)):
                if bit_checksum(tensor) != expected:
                    raise PMAStateError(
                        f"{path}: slot {k}, shard {i} does not match its checksum (corrupted)"
                    )
    world = files[0]["world_size"]
    ranks = sorted(f["rank"] for f in files)
    if ranks != list(range(world)):
        raise PMAStateError(
            f"{directory}: state was saved by {world} ranks but files for ranks {ranks} are here"
        )
    if len({f["version"] for f in files}) > 1:
        raise PMAStateError(f"{directory}: files of different format versions are mixed")
    return files


def apply_copies(
    files: list[dict[str, Any]], copies: list[Copy], slot: int, out: list[torch.Tensor]
) -> None:
    """Fill this rank's slot ``slot`` (``out[i]`` for shard i) from the saved files."""
    for c in copies:
        source = files[c.file]["slots"][slot][c.src_shard].view(-1)
        target = out[c.dst_shard].view(-1)
        target[c.dst : c.dst + c.numel].copy_(source[c.src : c.src + c.numel])
