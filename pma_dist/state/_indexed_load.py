"""Reading an indexed save (``_indexed``) back: each rank plans which saved runs fill its own
fragments (``_runs.plan_copies``), opens only the files those runs lie in, reads their headers
and only the chunks it needs, and verifies each chunk's checksum. Everything is read and checked
before a plane changes.

A compressed window's planes load the same way, element by element; the fp8 block scales move
with their blocks where the layout keeps them whole (``_scales``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import DTYPES
from ..backends import Shard
from ..core import AveragingState
from ..errors import PMAStateError
from ..kernels import Segment, decode_elements
from ._checksum import bit_checksum
from ._format import StateHeader
from ._indexed import (
    FORMAT,
    MAX_HEADER_BYTES,
    file_name,
    plane_keys,
    read_index,
    saved_runs,
    tensor_name,
)
from ._runs import Copy, plan_copies
from ._scales import block_copies
from ._transcode import transcode


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
            self._geometry = json.loads(meta.get("geometry", "{}"))
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

    def whole(self, name: str) -> torch.Tensor:
        """All of tensor ``name``, flat, each chunk verified."""
        entry = self._entries.get(name)
        if entry is None or entry["dtype"] not in DTYPES:
            raise PMAStateError(f"{self.path}: no tensor {name!r} of a known dtype")
        begin, end = entry["data_offsets"]
        numel = (end - begin) // DTYPES[entry["dtype"]].itemsize
        return self.slice(self.read(name, [(0, numel)]), 0, numel) if numel else torch.empty(0)

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

    def geometry(self, shard: int) -> list[Segment]:
        """Where the scale blocks of saved shard ``shard`` lie (a compressed fp8 save)."""
        try:
            return [Segment(*map(int, seg)) for seg in self._geometry[str(shard)]]
        except (KeyError, TypeError, ValueError) as err:
            raise PMAStateError(
                f"{self.path}: no block geometry for shard {shard} ({err!r})"
            ) from None

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class IndexedLoad:
    """A checked, fully read plan to load an indexed save: nothing has changed yet."""

    header: StateHeader
    staged: dict[str, list[tuple[int, int, torch.Tensor]]]
    """Per saved plane, ``(shard, flat offset, saved values)`` laid out like this rank's."""
    bytes_read: int = 0
    """Bytes this rank read from the rank files (headers included; the index not)."""
    files_opened: list[str] = field(default_factory=list)
    where: str = ""
    transcoded: bool = False
    """Whether the save is taken in as snapshots (another kind, or blocks cut elsewhere)
    rather than plane by plane."""

    def apply(self, state: AveragingState) -> None:
        """Fill every stored plane of ``state`` from what was read (the header's records then
        describe what the planes hold)."""
        state.wait_host()
        with torch.no_grad():
            if self.transcoded:
                records = transcode(
                    state,
                    self._dense(state),
                    self.header.compression,
                    self.header.records,
                    self.where,
                )
                self.header.records = records
                return
            for key, plane in state.stored():
                for shard, start, data in self.staged[key]:
                    plane[shard].view(-1)[start : start + data.numel()].copy_(data)

    def _dense(self, state: AveragingState):
        by_shard: dict[tuple[str, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for key, pieces in self.staged.items():
            for shard, start, data in pieces:
                by_shard[key, shard].append((start, data))

        def dense(key: str, i: int) -> torch.Tensor:
            pieces = by_shard[key, i]
            dtype = pieces[0][1].dtype if pieces else torch.float32
            out = torch.zeros(state.shapes[i], dtype=dtype, device=state.slots[0][i].device)
            for start, data in pieces:
                out.view(-1)[start : start + data.numel()].copy_(data)
            return out

        return dense


def plan_indexed(
    directory: Path, shards: list[Shard], ours: StateHeader, state: AveragingState
) -> IndexedLoad:
    """Read and check what this rank needs of the save under ``directory`` to fill the stored
    planes of ``state``: plane by plane where the save is of the same kind and its blocks move
    whole, else as snapshots taken in again (``_transcode``)."""
    where = str(directory)
    index = read_index(directory)
    header = StateHeader.from_flat(index["header"], where)
    header.check_matches(ours, where)
    keys, saved_keys = [key for key, _ in state.stored()], plane_keys(index)
    copies = plan_copies(saved_runs(index, where), shards)
    readers: dict[int, RankFileReader] = {}
    load = IndexedLoad(header, {}, where=where)

    def reader(file: int) -> RankFileReader:
        if file not in readers:
            path = Path(directory) / file_name(index["save_id"], file)
            readers[file] = RankFileReader(path, index["save_id"])
            load.files_opened.append(path.name)
        return readers[file]

    try:
        moves = None
        if header.compression == ours.compression and saved_keys == keys:
            if any(key.startswith("scales.") for key in keys):
                moves = block_copies(copies, lambda f, s: reader(f).geometry(s), state.segments)
            load.transcoded = moves is None and ours.compression == "fp8"
        else:
            load.transcoded = True
        element_keys = [key for key in saved_keys if not key.startswith("scales.")]
        decode = load.transcoded and header.compression == "fp8"
        for key in element_keys:
            load.staged[key] = _staged(reader, copies, key, decode and key.startswith("deltas."))
        if moves is not None:
            for key in saved_keys:
                if key.startswith("scales."):
                    load.staged[key] = _staged(reader, moves, key, False)
    finally:
        for r in readers.values():
            load.bytes_read += r.bytes_read
            r.close()
    return load


def _staged(reader, moves, key: str, decode: bool) -> list[tuple[int, int, torch.Tensor]]:
    """``(shard, offset, values)`` of the saved plane ``key`` for each of ``moves``; fp8
    differences decoded with their saved scales (``decode``: exact in bfloat16)."""
    out = []
    for file, src_shard, spans, targets in _grouped(moves):
        got = reader(file).read(tensor_name(key, src_shard), spans)
        if decode:
            scales = reader(file).whole(tensor_name(f"scales.{key[7:]}", src_shard))
            segments = reader(file).geometry(src_shard)
        for (src, n), (shard, dst) in zip(spans, targets):
            values = reader(file).slice(got, src, n)
            if decode:
                values = decode_elements(values, scales, segments, src).to(torch.bfloat16)
            out.append((shard, dst, values))
    return out


def _grouped(moves):
    """``(file, source shard, [(src, numel)], [(dst shard, dst)])`` per saved tensor read."""
    groups: dict[tuple[int, int], tuple[list, list]] = defaultdict(lambda: ([], []))
    for m in moves:
        spans, targets = groups[m.file, m.src_shard]
        spans.append((m.src, m.numel if isinstance(m, Copy) else m.count))
        targets.append((m.dst_shard, m.dst))
    for (file, src_shard), (spans, targets) in sorted(groups.items()):
        yield file, src_shard, spans, targets
