"""Averaging state as one safetensors file per rank plus one small index, resumed reading only
this rank's share.

Save (collective): the ranks describe their fragments (which parameter elements their shards
hold) to rank 0 relative to rank 0's own, in O(their share) (``_layout``), and rank 0
tells each rank which of its shards it saves: the first rank holding given elements, so DDP and
HSDP replicas and buffers are written once, not once per replica. Every rank writes
``pma_<id>_rank<r>.safetensors``, the stored planes of those shards flat (slots, or a compressed
window's base, differences and block scales, :func:`tensor_name`), with a checksum per chunk of
``CHUNK_NUMEL`` elements and, for block scales, where the blocks lie, in the file's header;
then rank 0 writes ``pma_index.json`` (the state header, the save's id and where each
parameter's elements lie, as run series: O(parameters) for FSDP2, HSDP and ZeRO-3 at any world
size), last and atomically. The id names the files, so
until the new index replaces the old one the previous save is whole; stale files are removed
afterwards.

Load (``_indexed_load``): every rank reads the index, plans which saved runs fill its own
fragments, reads only the chunks it needs and verifies them. Nothing is unpickled: JSON and raw
little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import _comm as comm
from .._io import fsync_path, replace_durably, write_safetensors
from ..backends import Shard
from ..errors import PMAStateError
from ..kernels import chunks
from ._checksum import bit_checksum
from ._format import StateHeader, check_version, written_version
from ._layout import describe_rank, exchanged, plan_save, shard_writes
from ._legacy import FORMAT
from ._runs import SavedRuns

INDEX = "pma_index.json"
INDEX_FORMAT = "pma_dist-index"
CHUNK_NUMEL = 1 << 15
"""Elements per checksummed chunk (128 KiB of fp32): the most a reader reads beyond its need at
each end of a saved run."""
MAX_HEADER_BYTES = 1 << 28


def file_name(save_id: str, rank: int) -> str:
    return f"pma_{save_id}_rank{rank:05d}.safetensors"


PLANE_PREFIXES = {"slots": "s", "base": "b", "deltas": "d", "scales": "e"}
"""How a stored plane's key (``slots.<k>``, ``base``, ``deltas.<k>``, ``scales.<k>``) begins
its tensors' names in a rank file."""


def tensor_name(plane: str | int, shard: int) -> str:
    """The name of shard ``shard`` of the stored plane ``plane`` in a rank file (an int: slot
    ``plane`` of an uncompressed window)."""
    if isinstance(plane, int):
        return f"s{plane}.{shard}"
    kind, _, k = plane.partition(".")
    return f"{PLANE_PREFIXES[kind]}{k}.{shard}"


def plane_keys(index: dict[str, Any]) -> list[str]:
    """The stored planes a save holds (saves before format 3 held slots only)."""
    return list(index.get("planes") or [f"slots.{k}" for k in range(int(index["num_slots"]))])


def has_index(directory: Path) -> bool:
    return (Path(directory) / INDEX).is_file()


def write_indexed(
    directory: Path,
    header: StateHeader,
    shards: list[Shard],
    planes: list[tuple[str, list[torch.Tensor]]],
    group: dist.ProcessGroup | None,
    geometry: list[list[list[int]]] | None = None,
) -> Path:
    """Write this rank's file (``planes``: each stored plane's key and tensors, one per shard;
    ``geometry``: where each shard's scale blocks lie) and, on rank 0, the index. Collective;
    returns once all is on disk on every rank."""
    rank = comm.rank(group)
    missing = [s.name for s in shards if s.local.numel() and not s.fragments]
    if missing:
        raise PMAStateError(f"shards {missing[:3]} have a layout without fragments")
    fragments = exchanged(shards)
    template = comm.broadcast_object(fragments if rank == 0 else None, group=group)
    layout = describe_rank(fragments, template)
    layouts = comm.gather_to_first(layout, group=group)
    plan = decisions = None
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        save_id = uuid.uuid4().hex[:12]
        empty = [(f.param, tuple(f.shape)) for s in shards for f in s.fragments if not f.numel]
        plan = plan_save(template, layouts, empty)
        decisions = [(save_id, d) for d in plan.writes]
    save_id, decision = comm.scatter_from_first(decisions, group=group)
    writes = shard_writes(layout, decision, fragments)
    path = directory / file_name(save_id, rank)
    version = written_version(header.compression)
    _write_rank_file(path, save_id, rank, planes, writes, geometry, version)
    comm.gather_to_first(None, group=group)
    if plan is not None:
        index = {
            "format": INDEX_FORMAT,
            "version": written_version(header.compression),
            "save_id": save_id,
            "world_size": len(layouts),
            "num_slots": header.num_slots,
            "planes": [key for key, _ in planes],
            "header": header.to_flat(),
            "params": plan.params,
        }
        replace_durably(directory / INDEX, json.dumps(index).encode())
        keep = {file_name(save_id, r) for r in range(len(layouts))}
        for stale in directory.glob("pma_*_rank*.safetensors"):
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
    comm.broadcast_object(None, group=group)
    return directory


def _write_rank_file(
    path: Path,
    save_id: str,
    rank: int,
    planes: list[tuple[str, list[torch.Tensor]]],
    writes: list[bool],
    geometry: list[list[list[int]]] | None,
    version: int,
) -> None:
    """A safetensors file of every plane of each shard this rank saves (``writes``), flat
    (:func:`tensor_name`), streamed one tensor at a time, with per-chunk checksums (and the
    blocks' geometry) in its metadata; written aside, then moved into place."""
    tensors = {
        tensor_name(key, i): t.reshape(-1)
        for key, plane in planes
        for i, t in enumerate(plane)
        if writes[i]
    }
    sums = {
        name: [bit_checksum(flat[part]) for part in chunks(flat.numel(), CHUNK_NUMEL)]
        for name, flat in tensors.items()
    }
    meta = {"format": FORMAT, "version": str(version), "save_id": save_id}
    meta |= {"rank": str(rank), "chunk_numel": str(CHUNK_NUMEL), "checksums": json.dumps(sums)}
    if geometry is not None:
        meta["geometry"] = json.dumps({str(i): g for i, g in enumerate(geometry) if writes[i]})
    temp = path.with_suffix(".tmp")
    write_safetensors(temp, tensors, meta)
    os.replace(temp, path)
    fsync_path(path.parent)


def read_index(directory: Path) -> dict[str, Any]:
    """The index of a save under ``directory``, checked for form."""
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PMAStateError(f"{path}: PMA state index does not load ({err})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise PMAStateError(f"{path}: not a pma_dist state index")
    check_version(index.get("version"), str(path))
    return index


def saved_runs(index: dict[str, Any], where: str) -> SavedRuns:
    """Where the elements of the save ``index`` describes lie (earlier releases listed every
    rank's fragments under ``files``)."""
    if "files" in index:
        return SavedRuns.of(index["files"])
    return SavedRuns.from_index(index.get("params"), index.get("world_size"), where)
