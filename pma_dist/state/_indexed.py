"""Averaging state as one safetensors file per rank plus one small index, resumed reading only
this rank's share.

Save (collective): the ranks describe their fragments (which parameter elements their shards
hold) to rank 0 relative to rank 0's own, in O(their share) (``_layout``), and rank 0
tells each rank which of its shards it saves: the first rank holding given elements, so DDP and
HSDP replicas and buffers are written once, not once per replica. Every rank writes
``pma_<id>_rank<r>.safetensors``, those slot tensors flat, with a checksum per chunk of
``CHUNK_NUMEL`` elements in the file's header; then rank 0 writes ``pma_index.json`` (the state
header, the save's id and where each parameter's elements lie, as run series: O(parameters) for
FSDP2, HSDP and ZeRO-3 at any world size), last and atomically. The id names the files, so
until the new index replaces the old one the previous save is whole; stale files are removed
afterwards.

Load: every rank reads the index, plans which saved runs fill its own fragments
(``_runs.plan_copies``), opens only the files those runs lie in, reads their
headers and only the chunks it needs, and verifies each chunk's checksum. Everything is read and
checked before a slot changes. Nothing is unpickled: JSON and raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import _comm as comm
from .._io import DTYPES, fsync_path, replace_durably, write_safetensors
from ..backends import Shard
from ..core import AveragingState
from ..errors import PMAStateError
from ..kernels import chunks
from ._checksum import bit_checksum
from ._format import FORMAT_VERSION, StateHeader, check_version
from ._layout import describe_rank, exchanged, plan_save, shard_writes
from ._legacy import FORMAT
from ._runs import Copy, SavedRuns, plan_copies

INDEX = "pma_index.json"
INDEX_FORMAT = "pma_dist-index"
CHUNK_NUMEL = 1 << 15
"""Elements per checksummed chunk (128 KiB of fp32): the most a reader reads beyond its need at
each end of a saved run."""
MAX_HEADER_BYTES = 1 << 28


def file_name(save_id: str, rank: int) -> str:
    return f"pma_{save_id}_rank{rank:05d}.safetensors"


def tensor_name(slot: int, shard: int) -> str:
    """The name of slot ``slot`` of shard ``shard`` in a rank file."""
    return f"s{slot}.{shard}"


def has_index(directory: Path) -> bool:
    return (Path(directory) / INDEX).is_file()


def write_indexed(
    directory: Path,
    header: StateHeader,
    shards: list[Shard],
    slots: list[list[torch.Tensor]],
    group: dist.ProcessGroup | None,
) -> Path:
    """Write this rank's file and, on rank 0, the index. Collective; returns once all is on
    disk on every rank."""
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
    _write_rank_file(directory / file_name(save_id, rank), save_id, rank, slots, writes)
    comm.gather_to_first(None, group=group)
    if plan is not None:
        index = {
            "format": INDEX_FORMAT,
            "version": FORMAT_VERSION,
            "save_id": save_id,
            "world_size": len(layouts),
            "num_slots": len(slots),
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
    path: Path, save_id: str, rank: int, slots: list[list[torch.Tensor]], writes: list[bool]
) -> None:
    """A safetensors file of every slot of each shard this rank saves (``writes``), flat
    (:func:`tensor_name`), streamed one tensor at a time, with per-chunk checksums in its
    metadata; written aside, then moved into place."""
    tensors = {
        tensor_name(k, i): t.reshape(-1)
        for k, slot in enumerate(slots)
        for i, t in enumerate(slot)
        if writes[i]
    }
    sums = {
        name: [bit_checksum(flat[part]) for part in chunks(flat.numel(), CHUNK_NUMEL)]
        for name, flat in tensors.items()
    }
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "save_id": save_id}
    meta |= {"rank": str(rank), "chunk_numel": str(CHUNK_NUMEL), "checksums": json.dumps(sums)}
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


class RankFileReader:
    """Reads checksummed chunks of one rank file with explicit ``pread`` calls, counting bytes."""

    def __init__(self, path: Path, save_id: str) -> None:
        self.path = path
        self.bytes_read = 0
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise PMAStateError(f"{path}: PMA state file is missing ({err.strerror})") from None
        size = os.fstat(self._fd).st_size
        length = int.from_bytes(self._pread(8, 0), "little")
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise PMAStateError(f"{path}: PMA state file does not load (bad header, truncated)")
        try:
            head = json.loads(self._pread(length, 8))
            meta = head.pop("__metadata__")
            self._sums = json.loads(meta["checksums"])
            self._chunk = int(meta["chunk_numel"])
        except (ValueError, KeyError, TypeError) as err:
            raise PMAStateError(f"{path}: PMA state file does not load ({err})") from None
        if meta.get("format") != FORMAT or meta.get("save_id") != save_id:
            raise PMAStateError(
                f"{path}: belongs to save {meta.get('save_id')!r}, the index to {save_id!r} "
                "(a save was interrupted, or files were mixed)"
            )
        self._entries, self._base, self._size = head, 8 + length, size

    def _pread(self, size: int, offset: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        self.bytes_read += len(data)
        if len(data) != size:
            raise PMAStateError(f"{self.path}: PMA state file does not load (truncated)")
        return data

    def read(self, name: str, spans: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
        """The chunks of tensor ``name`` that ``spans`` (``(start, numel)`` in elements) touch,
        each read once and verified, keyed by chunk index."""
        entry = self._entries.get(name)
        if entry is None or entry["dtype"] not in DTYPES:
            raise PMAStateError(f"{self.path}: no tensor {name!r} of a known dtype")
        dtype = DTYPES[entry["dtype"]]
        width = dtype.itemsize
        begin, end = entry["data_offsets"]
        numel = (end - begin) // width
        size = self._chunk
        wanted = sorted({c for a, n in spans for c in range(a // size, -(-(a + n) // size))})
        out = {}
        for c in wanted:
            lo, hi = c * self._chunk, min((c + 1) * self._chunk, numel)
            raw = self._pread((hi - lo) * width, self._base + begin + lo * width)
            chunk = torch.frombuffer(bytearray(raw), dtype=dtype)
            if bit_checksum(chunk) != self._sums[name][c]:
                raise PMAStateError(
                    f"{self.path}: {name}, elements [{lo}, {hi}) do not match their checksum "
                    "(corrupted)"
                )
            out[c] = chunk
        return out

    def slice(self, chunks_: dict[int, torch.Tensor], start: int, numel: int) -> torch.Tensor:
        """Elements ``[start, start + numel)`` out of chunks from :meth:`read`."""
        pieces = []
        cursor = start
        while cursor < start + numel:
            c, within = divmod(cursor, self._chunk)
            take = min(self._chunk - within, start + numel - cursor)
            pieces.append(chunks_[c][within : within + take])
            cursor += take
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class IndexedLoad:
    """A checked, fully read plan to load an indexed save: nothing has changed yet."""

    header: StateHeader
    staged: list[list[tuple[Copy, torch.Tensor]]]
    """Per slot, each copy with the saved elements it moves."""
    bytes_read: int = 0
    """Bytes this rank read from the rank files (headers included; the index not)."""
    files_opened: list[str] = field(default_factory=list)

    def apply(self, state: AveragingState) -> None:
        """Fill every slot of ``state`` from what was read."""
        state.wait_host()
        with torch.no_grad():
            for slot, staged in zip(state.slots, self.staged):
                for c, data in staged:
                    slot[c.dst_shard].view(-1)[c.dst : c.dst + c.numel].copy_(data)


def plan_indexed(directory: Path, shards: list[Shard], ours: StateHeader) -> IndexedLoad:
    """Read and check what this rank needs of the save under ``directory``."""
    index = read_index(directory)
    header = StateHeader.from_flat(index["header"], str(directory))
    header.check_matches(ours, str(directory))
    copies = plan_copies(saved_runs(index, str(directory)), shards)
    by_file: dict[int, list[Copy]] = defaultdict(list)
    for c in copies:
        by_file[c.file].append(c)
    num_slots = int(index["num_slots"])
    if num_slots != ours.num_slots:
        raise PMAStateError(
            f"{directory}: {num_slots} slots saved, this Merger holds {ours.num_slots}"
        )
    staged: list[list[tuple[Copy, torch.Tensor]]] = [[] for _ in range(num_slots)]
    load = IndexedLoad(header, staged)
    for file, file_copies in sorted(by_file.items()):
        path = Path(directory) / file_name(index["save_id"], file)
        reader = RankFileReader(path, index["save_id"])
        try:
            by_shard: dict[int, list[Copy]] = defaultdict(list)
            for c in file_copies:
                by_shard[c.src_shard].append(c)
            for k in range(num_slots):
                for src_shard, shard_copies in by_shard.items():
                    spans = [(c.src, c.numel) for c in shard_copies]
                    got = reader.read(tensor_name(k, src_shard), spans)
                    staged[k].extend((c, reader.slice(got, c.src, c.numel)) for c in shard_copies)
        finally:
            load.bytes_read += reader.bytes_read
            reader.close()
        load.files_opened.append(path.name)
    return load
