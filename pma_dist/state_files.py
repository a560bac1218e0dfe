"""Per-rank state in a layout-independent form: the resharding plan, and the reader of the
``pma_rank*.pt`` files that earlier releases wrote (saves now go through :mod:`.indexed_state`).

Each rank's slot tensors are described by the ``Fragment``s that say which parameter elements
each one holds, so a state saved under one layout (DeepSpeed ZeRO-2 on 8 ranks, say) loads under
another (ZeRO-3 on 16, FSDP2 on 4): :func:`plan_copies` maps saved runs onto this rank's and
checks that they cover every element it needs before anything changes.

``.pt`` files are plain data (dicts, lists, numbers, strings and tensors) loaded with
``torch.load(weights_only=True)``: a file that needs anything else is refused, so a crafted file
cannot run code on the ranks that resume from it. The tensors and the header each carry a
checksum, so a torn or edited file is refused too. Reading them touches every rank's file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backends.base import Shard
from .errors import PMAStateError
from .offload import chunks
from .state_format import StateHeader, check_version

FORMAT = "pma_dist-fragments"
FILE_GLOB = "pma_rank*.pt"


@dataclass(frozen=True)
class Copy:
    """``numel`` elements from saved file ``file``, shard ``src_shard`` at flat ``src`` into
    local shard ``dst_shard`` at flat ``dst``."""

    file: int
    src_shard: int
    src: int
    dst_shard: int
    dst: int
    numel: int


def bit_checksum(tensor: torch.Tensor) -> int:
    """Sum of the tensor's bits read as integers: equal exactly when (almost surely) the
    contents are; cheap enough to check a whole state on load."""
    if tensor.numel() == 0:
        return 0
    kinds = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    bits = tensor.detach().contiguous().view(kinds[tensor.element_size()]).view(-1)
    total = torch.zeros((), dtype=torch.int64, device=tensor.device)
    for part in chunks(bits.numel()):
        total += bits[part].sum(dtype=torch.int64)
    return int(total.item())


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


@dataclass
class SavedRuns:
    """Where each saved parameter's elements lie: per parameter, its runs
    ``(start, numel, file, shard, local_start)`` sorted by start, and its global shape (in the
    order parameters were first saved). Built once per save, planned against many times."""

    runs: dict[str, list[tuple[int, int, int, int, int]]]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, files: list[dict[str, Any]]) -> SavedRuns:
        """The runs of ``files``, each a dict whose ``fragments`` list per shard the runs it
        holds as ``(param, shape, start, numel, local_start)``."""
        runs: dict[str, list[tuple[int, int, int, int, int]]] = defaultdict(list)
        shapes: dict[str, tuple[int, ...]] = {}
        for index, f in enumerate(files):
            for shard_index, fragments in enumerate(f["fragments"]):
                for param, shape, start, numel, local_start in fragments:
                    runs[param].append((start, numel, index, shard_index, local_start))
                    shapes[param] = tuple(shape)
        for param_runs in runs.values():
            param_runs.sort()
        return cls(dict(runs), shapes)


def plan_copies(
    saved: SavedRuns, shards: list[Shard], *, skip: set[int] | frozenset = frozenset()
) -> list[Copy]:
    """The copies that fill every fragment of ``shards`` (but those at indices ``skip``) from
    the ``saved`` runs.

    Raises ``PMAStateError`` naming the first parameter whose elements are not all saved or
    whose shape differs. Replicas saved by several ranks are read once.
    """
    shapes = saved.shapes
    copies = []
    for dst_shard, shard in enumerate(shards):
        if dst_shard in skip:
            continue
        for frag in shard.fragments:
            if frag.param not in shapes:
                raise PMAStateError(f"saved PMA state has no parameter {frag.param!r}")
            if shapes[frag.param] != tuple(frag.shape):
                raise PMAStateError(
                    f"saved PMA state has {frag.param!r} with shape {shapes[frag.param]}, "
                    f"this model has {tuple(frag.shape)}"
                )
            cursor, end = frag.start, frag.start + frag.numel
            for start, numel, index, src_shard, local_start in saved.runs[frag.param]:
                if start > cursor or cursor >= end:
                    break
                stop = min(start + numel, end)
                if stop > cursor:
                    copies.append(
                        Copy(
                            index,
                            src_shard,
                            local_start + cursor - start,
                            dst_shard,
                            frag.local_start + cursor - frag.start,
                            stop - cursor,
                        )
                    )
                    cursor = stop
            if cursor < end:
                raise PMAStateError(
                    f"saved PMA state lacks elements [{cursor}, {end}) of {frag.param!r}"
                )
    return copies


def apply_copies(
    files: list[dict[str, Any]], copies: list[Copy], slot: int, out: list[torch.Tensor]
) -> None:
    """Fill this rank's slot ``slot`` (``out[i]`` for shard i) from the saved files."""
    for c in copies:
        source = files[c.file]["slots"][slot][c.src_shard].view(-1)
        target = out[c.dst_shard].view(-1)
        target[c.dst : c.dst + c.numel].copy_(source[c.src : c.src + c.numel])
