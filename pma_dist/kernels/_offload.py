"""Where averaging slots live, and how snapshots reach slots in host memory.

Slots offloaded to the CPU are pinned when the parameters sit on an accelerator, so that a
snapshot is an asynchronous device-to-host copy on a side stream: forward and backward of the
next step overlap with it, and only the next optimizer step (which overwrites the parameters)
waits for it. Everything here is device-agnostic (CUDA, XPU, ... through
``torch.get_device_module``); on CPU-only runs it reduces to plain copies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

STAGING_NUMEL = 1 << 24
"""Elements per chunk when host slots are combined with device tensors (64 MiB of fp32)."""


def slot_device(live: torch.device, offload: str) -> torch.device:
    """The device that holds the slots of a tensor living on ``live``."""
    return torch.device("cpu") if offload == "cpu" else live


def empty_slot(like: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed slot shaped like ``like``; pinned when it is host memory for a device tensor.

    Zeroed by writing, not by ``calloc``: the pages are committed now, so running out of
    memory happens at construction and the first snapshot costs what every later one does.
    """
    pin = device.type == "cpu" and like.device.type != "cpu"
    return torch.empty(like.shape, dtype=dtype, device=device, pin_memory=pin).zero_()


def chunks(numel: int, size: int = STAGING_NUMEL) -> Iterator[slice]:
    """Consecutive flat ranges of at most ``size`` elements covering ``numel``."""
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


class SideStreamCopy:
    """Copies accelerator tensors into pinned host slots on a side stream.

    ``wait_device`` orders the current stream after the copy (call it before the copied tensors
    are overwritten, e.g. in an optimizer step pre-hook); ``wait_host`` blocks the host until
    the copy is done (call it before the slots are read on the host).
    """

    def __init__(self, device: torch.device) -> None:
        self._module = torch.get_device_module(device)
        self._device = device
        self._stream = self._module.Stream(device=device)
        self._event = None

    def copy(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> Any:
        """Start ``dst[i].copy_(src[i])`` for all i, after the work queued so far on ``src``;
        the event that marks its end.

        A copy that changes dtype converts on the device first; chunks bound that temporary."""
        self._stream.wait_stream(self._module.current_stream(self._device))
        for tensor in src:
            tensor.record_stream(self._stream)
        same = [(d, s) for d, s in zip(dst, src) if d.dtype == s.dtype]
        converted = [(d, s) for d, s in zip(dst, src) if d.dtype != s.dtype]
        with self._module.stream(self._stream):
            if same:
                torch._foreach_copy_([d for d, _ in same], [s for _, s in same], non_blocking=True)
            for d, s in converted:
                flat_dst, flat_src = d.view(-1), s.view(-1)
                for part in chunks(d.numel()):
                    flat_dst[part].copy_(flat_src[part], non_blocking=True)
            self._event = self._module.Event()
            self._event.record(self._stream)
        return self._event

    def wait_device(self) -> None:
        """Make the current stream wait for the pending copy (no host sync)."""
        if self._event is not None:
            self._module.current_stream(self._device).wait_event(self._event)

    def wait_host(self) -> None:
        """Block until the pending copy has finished."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
