"""Writing a planned Hugging Face export as the tensors stream in.

Each output file belongs to one rank (round robin); a rank keeps only the tensors of its own
files, writes a file as soon as its last tensor arrives, and so holds at most one file being
filled plus the tensor in hand. Files are written on a background thread and fsynced on another
while the next tensors are gathered.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .._io import fsync_path, write_safetensors
from ._atomic import ExportError, describe_os_error
from ._hf_plan import Convert, HFPlan
from ._progress import progress_bar


class HFWriter:
    """Receives full source tensors in plan order and writes this rank's files as they fill.

    Errors while writing are kept, not raised, so that the rank keeps taking part in the
    collective walk over the tensors and every rank learns of the failure together.
    """

    def __init__(
        self, plan: HFPlan, directory: Path, rank: int, world: int, convert: Convert, progress: bool
    ) -> None:
        self.plan = plan
        self.directory = directory
        self.rank = rank
        self.mine = {f for i, f in enumerate(plan.files) if i % world == rank}
        self.convert = convert
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.seen: set[str] = set()
        self.written: dict[str, dict] = {}
        self.error: str | None = None
        self._bar = progress_bar(len(self.mine), f"rank {rank} writing", progress)
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pma-export-writer")
        self._flush = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pma-export-fsync")
        self._in_flight: Future | None = None
        self._flushed: list[Future] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            return
        try:
            for out_name, out in self.convert(name, tensor).items():
                self._take(out_name, out)
        except ExportError as err:
            self.error = str(err)

    def _take(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.plan.file_of:
            raise ExportError(f"tensor {name!r} is not in the export plan")
        if name in self.seen:
            raise ExportError(f"tensor {name!r} arrived twice")
        self.seen.add(name)
        file = self.plan.file_of[name]
        if file not in self.mine:
            return
        shape, dtype = self.plan.outputs[name]
        if tuple(tensor.shape) != shape:
            raise ExportError(f"tensor {name!r} has shape {tuple(tensor.shape)}, planned {shape}")
        if tensor.is_meta:
            raise ExportError(f"tensor {name!r} of this rank's file {file} was not delivered")
        self.pending.setdefault(file, {})[name] = _standalone(tensor, dtype)
        if len(self.pending[file]) == self.plan.expected_per_file[file]:
            self._write(file, self.pending.pop(file))

    def _write(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        """Hand a full file to the background writer, which writes and hashes it while the next
        tensors are gathered; at most one file is in flight (so a rank holds at most two files:
        that one and the one filling). Its fsync runs on a third thread while the next file is
        written, so that the disk does not wait for the writer at each file's end."""
        if self._in_flight is not None:
            self._in_flight.result()
        self._in_flight = self._disk.submit(self._write_now, file, tensors)
        self.written[file] = self._in_flight

    def _write_now(self, file: str, tensors: dict[str, torch.Tensor]) -> dict:
        path = self.directory / file
        try:
            entry = write_safetensors(path, tensors, {"format": "pt"}, sync=False)
        except OSError as err:
            raise describe_os_error(err, path) from err
        self._flushed.append(self._flush.submit(self._sync_now, path))
        return entry

    def _sync_now(self, path: Path) -> None:
        try:
            fsync_path(path)
        except OSError as err:
            raise describe_os_error(err, path) from err
        self._bar.update(1)

    def finish(self) -> dict[str, dict]:
        """Manifest entries of the files this rank wrote; records an error if any planned
        tensor never came."""
        self._disk.shutdown(wait=True)
        self._flush.shutdown(wait=True)
        self._bar.close()
        written = {}
        for file, future in self.written.items():
            try:
                written[file] = future.result()
            except ExportError as err:
                self.error = self.error or str(err)
        for future in self._flushed:
            try:
                future.result()
            except ExportError as err:
                self.error = self.error or str(err)
        self.written = written
        if self.error is None:
            missing = sorted(set(self.plan.outputs) - self.seen)
            if missing:
                self.error = f"{len(missing)} planned tensor(s) never arrived, e.g. {missing[:3]}"
            elif self.pending:
                self.error = f"files left incomplete: {sorted(self.pending)}"
        return self.written


def _standalone(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` on the CPU in ``dtype``, contiguous and sharing storage with nothing else
    (safetensors refuses aliases); copied only when it has to be."""
    alias = tensor._base is not None or tensor.storage_offset() != 0
    if (
        tensor.dtype == dtype
        and tensor.device.type == "cpu"
        and tensor.is_contiguous()
        and not alias
    ):
        return tensor
    out = torch.empty(tensor.shape, dtype=dtype)
    out.copy_(tensor)
    return out
