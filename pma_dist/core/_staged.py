"""Snapshots of accelerator tensors into a compressed window kept in host memory
(``offload = "cpu"``): copied as they are, then encoded on the host while training goes on.

The device holds nothing for it: no base, no scratch. A snapshot starts the device-to-host copy
of the shard into a pinned staging copy on a side stream (as the uncompressed window's offload
does, so the next optimizer step waits for that copy only) and hands the encode to a worker
thread, which waits for the copy and runs the compiled CPU kernel (it releases the GIL). The
verdict is the host encode's own, element by element, in a 0-dim CPU flag the worker fills: it
is read only after :meth:`HostStaging.join`, which everything that reads the window (merges,
saves, the agreement) calls first, as the next snapshot does before it reuses the staging copy.
The host holds the staging copy beside the window: the shard once more, in its own dtype.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..kernels import SideStreamCopy, Tensors, empty_slot


class HostStaging:
    """A pinned host copy of a shard, filled on side streams, and one encode job at a time."""

    def __init__(self, like: Tensors, copies: dict[torch.device, SideStreamCopy]) -> None:
        self.staging = [empty_slot(t, t.dtype, torch.device("cpu")) for t in like]
        """Per averaged tensor, its host copy (pinned for accelerator tensors)."""
        self._copies = copies
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.staging)

    def start(self, tensors: Tensors, job: Callable[[Tensors], torch.Tensor]) -> torch.Tensor:
        """Copy ``tensors`` into the staging copy and run ``job`` on it in the worker once the
        copy has landed; a 0-dim CPU flag that holds the job's verdict after :meth:`join`."""
        self.join()
        events = []
        for device, side in self._copies.items():
            pairs = [(s, t) for s, t in zip(self.staging, tensors) if t.device == device]
            events.append(side.copy([s for s, _ in pairs], [t for _, t in pairs]))
        for staged, tensor in zip(self.staging, tensors):
            if tensor.device.type == "cpu":
                staged.copy_(tensor)
        flag = torch.zeros(())

        devices = list(self._copies)

        def work() -> None:
            try:
                if devices:  # this thread's current device: the shard's, not device 0
                    torch.get_device_module(devices[0]).set_device(devices[0])
                for event in events:
                    event.synchronize()
                flag.copy_(job(self.staging))
            except BaseException as err:  # noqa: BLE001 - raised again by join()
                self._error = err

        self._worker = threading.Thread(target=work, name="pma-host-encode", daemon=True)
        self._worker.start()
        return flag

    def join(self) -> None:
        """Wait for the pending encode; raise what it raised."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError("the host encode of the last snapshot failed") from error
