"""Whole tensors read back from a per-rank save (``_indexed``) in one process,
for offline tools: one parameter and the slots asked for at a time, each chunk verified.

The index names every saved run of every parameter, so a tensor is assembled from the files
that hold it alone, whatever the layout it was saved under (FSDP2 rows, DeepSpeed flat
partitions, replicas read once).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from ..backends import Fragment, Shard
from ..kernels import decode_elements
from ._format import StateHeader
from ._indexed import file_name, read_index, saved_runs, tensor_name
from ._indexed_load import RankFileReader
from ._runs import plan_copies


class SavedTensors:
    """The parameters of a per-rank save under ``directory``, readable whole."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._index = read_index(self.directory)
        self.header = StateHeader.from_flat(self._index["header"], str(self.directory))
        """The saved state's header (settings, counts, slot records)."""
        self.dtype: torch.dtype = getattr(torch, self.header.config.get("dtype", "float32"))
        """The slots' dtype (the Merger's accumulation dtype)."""
        self._runs = saved_runs(self._index, str(self.directory))
        self.shapes: dict[str, tuple[int, ...]] = self._runs.shapes
        """Every saved tensor's global shape, in the order first saved."""
        self._readers: dict[int, RankFileReader] = {}

    def read(self, name: str, slots: Sequence[int | str]) -> list[torch.Tensor]:
        """Tensor ``name`` as saved in each of ``slots`` (slot numbers, or stored planes' keys:
        ``base``, ``deltas.<k>``), whole; fp8 differences come decoded to float32 with their
        block scales. ``PMAStateError`` if an element is missing or a chunk fails its
        checksum."""
        shape = self.shapes[name]
        numel = math.prod(shape)
        whole = Shard(name, torch.empty(0), shape, None, (Fragment(name, shape, 0, numel),))
        by_file = defaultdict(list)
        for copy in plan_copies(self._runs, [whole]):
            by_file[copy.file].append(copy)
        fp8 = self.header.compression == "fp8"
        out: list[torch.Tensor | None] = [None] * len(slots)
        for file, copies in by_file.items():
            reader = self._reader(file)
            for i, slot in enumerate(slots):
                for src_shard in {c.src_shard for c in copies}:
                    mine = [c for c in copies if c.src_shard == src_shard]
                    got = reader.read(
                        tensor_name(slot, src_shard), [(c.src, c.numel) for c in mine]
                    )
                    decode = fp8 and isinstance(slot, str) and slot.startswith("deltas.")
                    if decode:
                        scales = reader.whole(tensor_name(f"scales.{slot[7:]}", src_shard))
                        segments = reader.geometry(src_shard)
                    for c in mine:
                        piece = reader.slice(got, c.src, c.numel)
                        if decode:
                            piece = decode_elements(piece, scales, segments, c.src)
                        if out[i] is None:
                            out[i] = torch.empty(numel, dtype=piece.dtype)
                        out[i][c.dst : c.dst + c.numel] = piece
        return [(t if t is not None else torch.empty(0)).view(shape) for t in out]

    def _reader(self, file: int) -> RankFileReader:
        if file not in self._readers:
            path = self.directory / file_name(self._index["save_id"], file)
            self._readers[file] = RankFileReader(path, self._index["save_id"])
        return self._readers[file]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
