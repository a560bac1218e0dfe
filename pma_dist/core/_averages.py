"""The two averaging states of a shard, both exact, and the one a config asks for.

* :class:`WindowAverage` - the paper's definition: a ring of the last N snapshots. Merged weights
  are computed from the ring when asked, so there is no running-sum drift, and any weighting of
  the same snapshots (SMA, WMA, EMA within the window, user weights) is available at merge time.
* :class:`RunningAverage` - one slot, and every snapshot is one ``lerp`` with a scalar weight:
  cumulative SMA 1/k, cumulative WMA 2/(k+1), EMA alpha (1 for the first snapshot).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..config import PMAConfig
from ..kernels import BLOCK, Runs, Tensors, fold_group
from ._compressed import CompressedWindow
from ._records import SlotRecord
from ._slots import AveragingState
from ._spec import MergeSpec
from ._weights import running_weight


class WindowAverage(AveragingState):
    """A ring of the last ``window`` snapshots; merges computed from it on demand."""

    mode = "window"

    def __init__(self, like: Tensors, window: int, **kwargs) -> None:
        super().__init__(like, window, **kwargs)
        self.window = window

    def snapshot(
        self, tensors: Tensors, step: int = 0, tokens: int = 0, check: bool = False
    ) -> torch.Tensor | None:
        """Copy ``tensors`` into the next slot; with ``check``, return this rank's verdict on
        it as a 0-dim flag left on the device (see :meth:`reject` for a slot found bad)."""
        self._check(tensors)
        self.wait_host()
        slot = self.next_slot()
        finite = self._copy_into(self.slots[slot], tensors, check)
        self.records[slot] = SlotRecord(self.next_seq, step, tokens)
        self.next_seq += 1
        self.count += 1
        return finite

    def reject(self, seq: int) -> tuple[SlotRecord, Tensors | None] | None:
        """Leave snapshot ``seq`` out of every merge and of the count (found non-finite after
        it was written); its slot is reused first. Its record and that slot's tensors, or None
        if no slot holds it."""
        for k, record in enumerate(self.records):
            if record is not None and record.seq == seq and record.valid:
                self.drop([k])
                self.count -= 1
                return record, self.slots[k]
        return None

    def rebuild(self, tensor: int, snapshots) -> None:
        """Write the snapshots ``snapshots`` yields (one tensor each, oldest first) into the
        slots from the first, for averaged tensor ``tensor`` (a state taken from a save of
        another kind)."""
        for slot, snapshot in zip(self.slots, snapshots):
            slot[tensor].copy_(snapshot)

    def drop(self, slots: Sequence[int]) -> None:
        """Leave ``slots`` out of every later merge; later snapshots reuse them first."""
        for k in slots:
            record = self.records[k]
            if record is not None:
                self.records[k] = SlotRecord(record.seq, record.step, record.tokens, False)

    def drop_since(self, step: int) -> list[SlotRecord]:
        """Drop every merged snapshot taken at ``step`` or later; their records, oldest first."""
        dropped = [k for k in self.logical_slots() if self.records[k].step >= step]
        records = [self.records[k] for k in dropped]
        self.drop(dropped)
        return records


class RunningAverage(AveragingState):
    """One slot folded with a lerp per snapshot: cumulative SMA/WMA or EMA.

    A snapshot is folded in only where the ranks' agreed verdict on it says finite (a NaN
    folded in cannot be taken out), and the verdict is not read by the host: the number of
    snapshots folded, which sets the next weight, is kept beside the slot. ``count`` and the
    record count every snapshot taken until the verdicts are settled (:meth:`reject`,
    :meth:`settle`), as in window mode.
    """

    mode = "running"

    def __init__(self, like: Tensors, method: str, alpha: float = 0.2, **kwargs) -> None:
        super().__init__(like, 1, **kwargs)
        self.method = method
        self.alpha = alpha
        device = self.slots[0][0].device if like else torch.device("cpu")
        self.folded = torch.zeros((), dtype=torch.int64, device=device)
        """Snapshots folded into the slot, kept beside it (0-dim)."""
        self._settled: SlotRecord | None = None
        self._unsettled: list[SlotRecord] = []

    def weights(self, spec: MergeSpec, alpha: float) -> list[float]:
        chosen = (spec.weights, spec.last, spec.stride)
        if any(x is not None for x in chosen) or spec.method != self.method:
            raise ValueError(
                f"running mode (pma.window = null) keeps a single {self.method!r} average; "
                f"method={spec.method or self.method!r}/weights/last/stride need window mode "
                "(pma.window = N)"
            )
        return [1.0]

    def next_slot(self) -> int:
        return 0

    def snapshot(
        self, tensors: Tensors, step: int = 0, tokens: int = 0, verdict: torch.Tensor | None = None
    ) -> None:
        """Fold ``tensors`` in, unless ``verdict`` (a 0-dim flag every rank agreed on, left on
        the device) is 0; the slot is then unchanged."""
        self._check(tensors)
        ok = None if verdict is None else verdict.to(self.folded.device)
        weight = running_weight(self.method, self.folded.double() + 1, self.alpha)
        slot, live = self.real(self.slots[0]), self.real(tensors)
        for group in self._real_groups:
            fold_group([slot[i] for i in group], [live[i] for i in group], weight, ok)
        self.folded += 1 if ok is None else ok.to(torch.int64)
        self.records[0] = SlotRecord(self.next_seq, step, tokens)
        self._unsettled.append(self.records[0])
        self.next_seq += 1
        self.count += 1
        if verdict is None:
            self.settle()

    def reject(self, seq: int) -> tuple[SlotRecord, Tensors | None] | None:
        """Take snapshot ``seq`` (not folded in: its verdict was 0) out of the count and the
        record. Its record (and None: no slot holds it), or None if it awaits no verdict."""
        for k, record in enumerate(self._unsettled):
            if record.seq == seq:
                del self._unsettled[k]
                self.count -= 1
                self.records[0] = self._unsettled[-1] if self._unsettled else self._settled
                return record, None
        return None

    def settle(self) -> None:
        """Every verdict so far is known: the record now is the last snapshot folded in."""
        self._settled = self.records[0]
        self._unsettled = []

    def restore(self, count: int, records: Sequence[SlotRecord | None]) -> None:
        super().restore(count, records)
        self.folded.fill_(count)
        self.settle()


def state_for(
    config: PMAConfig,
    like: Tensors,
    runs: Sequence[Runs],
    blocks: Sequence[int] | None = None,
) -> AveragingState:
    """The averaging state ``config`` describes, for tensors shaped like ``like``; ``blocks``
    gives the elements per fp8 block along each tensor's rows (default 128)."""
    dtype = getattr(torch, config.dtype)
    wider = sorted({str(t.dtype) for t in like if t.element_size() > dtype.itemsize})
    if wider:
        warnings.warn(
            f"pma.dtype = {config.dtype!r} is lower precision than parameters of dtype "
            f"{', '.join(wider)}; averages lose precision",
            stacklevel=4,
        )
    options = {"offload": config.offload, "runs": runs}
    if config.running:
        return RunningAverage(like, config.method, config.ema_alpha, dtype=dtype, **options)
    if config.compression == "none":
        return WindowAverage(like, config.window, dtype=dtype, **options)
    blocks = [BLOCK] * len(like) if blocks is None else list(blocks)
    return CompressedWindow(like, config.window, code=config.compression, blocks=blocks, **options)
