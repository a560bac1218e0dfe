"""The compressed window: the last N snapshots held as one float32 base and N - 1 coded
differences, 4 + (N - 1) * b bytes an element instead of 4 * N (b = 2 for ``bf16``, 1 + 1/128
for ``fp8``; :mod:`pma_dist.kernels` has the codes).

The base R is the newest snapshot as reconstructed. A snapshot writes d = q(theta - R) into a
free plane and adds deq(d) to R (error feedback: R - theta is one rounding of d, never a sum of
them). Snapshot j is R - sum_{i > j} deq(d_i): the sum telescopes, so each snapshot carries its
own one rounding (plus float32 summation noise). A merge sum_j w_j theta_j is one pass,
W * R - sum_i deq(d_i) * P_i with W the weights' sum and P_i the sum of the weights of the
snapshots older than i; the oldest snapshot's difference is never needed, so it is not kept.

The chain is read in snapshot order, so it changes only at its ends. A new snapshot takes the
plane the second-oldest frees when the window is full. A snapshot found non-finite after it was
written keeps its difference, with weight 0, until it leaves the window (the window holds one
valid snapshot fewer until then): older snapshots are reconstructed through it. Where a live
value is NaN/Inf the difference is 0 and R keeps its value, so no plane ever holds a
non-finite value. Dropping snapshots (a loss-spike rollback) takes the newest off the chain and
rewinds R by their differences.

Records: ``records[0]`` is the oldest snapshot (no plane of its own), ``records[k]`` for
k >= 1 the snapshot whose difference plane k holds; ``slots[0]`` is R, ``slots[k]`` plane k.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import astuple, replace

import torch

from ..kernels import (
    CODE_DTYPES,
    Runs,
    Tensors,
    copy_checked,
    delta_segments,
    encode_delta,
    exps_shape,
    merge_deltas,
    slot_device,
)
from ._records import SlotRecord
from ._slots import AveragingState
from ._staged import HostStaging


def chain_of(records: Sequence[SlotRecord | None]) -> list[int]:
    """Physical planes of the snapshots a compressed window holds, oldest first."""
    held = [k for k, r in enumerate(records) if r is not None]
    return sorted(held, key=lambda k: records[k].seq)


def merge_terms(
    records: Sequence[SlotRecord | None], weights: Sequence[float]
) -> tuple[float, list[tuple[int, float]]]:
    """For a chain with ``records`` (``records[0]`` the oldest) and one weight per valid
    snapshot, oldest first: the weight W of the base, and ``(plane, P)`` for each difference a
    merge reads, P being the weight of the snapshots older than the plane's (never 0)."""
    chain = chain_of(records)
    valid = [k for k in chain if records[k].valid]
    weight_of = dict(zip(valid, (float(w) for w in weights)))
    older, terms = 0.0, []
    for k in chain:
        if k != chain[0] and older != 0:
            terms.append((k, older))
        older += weight_of.get(k, 0.0)
    return older, terms


class CompressedWindow(AveragingState):
    """A window of the last ``window`` snapshots stored as a base and coded differences."""

    mode = "window"

    def __init__(
        self,
        like: Tensors,
        window: int,
        *,
        code: str,
        blocks: Sequence[int],
        offload: str = "none",
        runs: Sequence[Runs] | None = None,
        stage: bool | None = None,
    ) -> None:
        super().__init__(like, 0, dtype=torch.float32, offload=offload, runs=runs)
        stage = bool(self._side_copies) if stage is None else stage
        self._staging = HostStaging(like, self._side_copies) if stage else None
        """Where snapshots wait to be encoded on the host (``_staged``): with ``stage``, by
        default where accelerator tensors keep their window in host memory."""
        self.window = window
        self.code = code
        """The difference code: ``"bf16"`` or ``"fp8"``."""
        self.blocks = list(blocks)
        """Per tensor, the elements of an fp8 block along its rows (128, or 1 where a layout
        cuts rows, so that every element carries its own scale)."""
        self.segments = [
            delta_segments(t.shape, r, b) for t, r, b in zip(like, self.runs, self.blocks)
        ]

        def plane(dtype, shape=None):
            return [
                torch.zeros(
                    t.shape if shape is None else shape(i),
                    dtype=dtype,
                    device=slot_device(t.device, offload),
                )
                for i, t in enumerate(like)
            ]

        differences = [plane(CODE_DTYPES[code]) for _ in range(window - 1)]
        self.slots = [plane(torch.float32), *differences]
        scale_shape = lambda i: exps_shape(like[i].shape, self.runs[i], self.blocks[i])  # noqa: E731
        self.scales: list[list[torch.Tensor]] = [
            plane(torch.uint8, scale_shape) for _ in differences if code == "fp8"
        ]
        """Per difference plane (``scales[k - 1]`` goes with ``slots[k]``), each tensor's
        block exponents (fp8 only)."""
        self.records = [None] * window

    @property
    def nbytes(self) -> int:
        """Bytes of the base, the planes and their scales, and the host staging copy if any."""
        planes = [*self.slots, *self.scales]
        staged = self._staging.nbytes if self._staging is not None else 0
        return staged + sum(t.numel() * t.element_size() for plane in planes for t in plane)

    def wait_host(self) -> None:
        """Block until the pending snapshot is in the window (copied, and encoded). If its
        host encode failed, the window is emptied (the base may be half updated: the next
        snapshot starts a new chain) and the error raised."""
        super().wait_host()
        if self._staging is None:
            return
        try:
            self._staging.join()
        except RuntimeError:
            self.records, self.count = [None] * self.window, 0
            raise

    def chain(self) -> list[int]:
        """Physical planes of the held snapshots, oldest first (0 is the oldest's)."""
        return chain_of(self.records)

    def next_slot(self) -> int:
        chain = self.chain()
        if len(chain) == self.window:
            return chain[1] if self.window > 1 else 0
        return next((k for k in range(1, self.window) if self.records[k] is None), 0)

    def geometry(self) -> list[list[list[int]]] | None:
        if not self.scales:
            return None
        return [[list(astuple(seg)) for seg in segs] for segs in self.segments]

    def stored(self) -> list[tuple[str, list[torch.Tensor]]]:
        """``base`` (R), ``deltas.<k>`` (plane k's differences) and ``scales.<k>`` (their
        block exponents, fp8): keys no uncompressed window uses, so that a checkpoint of one
        kind never fills the other."""
        self.wait_host()
        deltas = [(f"deltas.{k}", self.slots[k]) for k in range(1, self.window)]
        scales = [(f"scales.{k}", plane) for k, plane in enumerate(self.scales, 1)]
        return [("base", self.slots[0]), *deltas, *scales]

    def snapshot(
        self, tensors: Tensors, step: int = 0, tokens: int = 0, check: bool = False
    ) -> torch.Tensor | None:
        """Encode ``tensors`` as the newest snapshot; this rank's verdict as a 0-dim flag left
        on the device (a non-finite element is stored as no change, so the planes stay
        finite either way)."""
        self._check(tensors)
        self.wait_host()
        chain = self.chain()
        record = SlotRecord(self.next_seq, step, tokens)
        if not chain or self.window == 1:
            encode = self._restart
            self.records = [record] + [None] * (self.window - 1)
        else:
            plane = self.next_slot()
            if len(chain) == self.window:
                self.records[0], self.records[plane] = self.records[plane], None
            encode = functools.partial(self._encode, plane=plane)
            self.records[plane] = record
        flag = encode(tensors) if self._staging is None else self._staging.start(tensors, encode)
        self.next_seq += 1
        self.count += 1
        return flag if check else None

    def _restart(self, tensors: Tensors) -> torch.Tensor:
        """R := the snapshot, exactly (the first of a chain), non-finite elements as 0."""
        base, live = self.real(self.slots[0]), self.real(tensors)
        flags = [copy_checked([b], [x]) for b, x in zip(base, live)]
        for b in base:
            torch.nan_to_num_(b, nan=0.0, posinf=0.0, neginf=0.0)
        return self._all(flags, tensors)

    def _encode(self, tensors: Tensors, plane: int) -> torch.Tensor:
        scales = self.scales[plane - 1] if self.scales else [None] * len(tensors)
        flags = [
            encode_delta(self.code, base, live, delta, exps, segs)
            for base, live, delta, exps, segs in zip(
                self.slots[0], tensors, self.slots[plane], scales, self.segments
            )
        ]
        return self._all(flags, tensors)

    @staticmethod
    def _all(flags: list[torch.Tensor], tensors: Tensors) -> torch.Tensor:
        if not flags:
            return torch.ones((), device=tensors[0].device if tensors else "cpu")
        return torch.stack([f.to(flags[0].device) for f in flags]).min()

    def rebuild(self, tensor: int, snapshots, planes: Sequence[int] | None = None) -> None:
        """Encode the snapshots ``snapshots`` yields (one tensor each, oldest first) as a new
        chain for averaged tensor ``tensor`` (a state taken from a save of another kind or
        block layout): the first exactly into the base, each later one as a difference into
        the plane ``planes`` names for it (``planes[j]`` for snapshot j, ``planes[0]`` being
        the base's 0; default: the planes in order from the first)."""
        self.wait_host()
        base = self.slots[0][tensor]
        for j, snapshot in enumerate(snapshots):
            if j == 0:
                torch.nan_to_num_(base.copy_(snapshot), nan=0.0, posinf=0.0, neginf=0.0)
                continue
            plane = j if planes is None else planes[j]
            exps = self.scales[plane - 1][tensor] if self.scales else None
            delta = self.slots[plane][tensor]
            encode_delta(self.code, base, snapshot, delta, exps, self.segments[tensor])

    def reject(self, seq: int) -> tuple[SlotRecord, Tensors | None] | None:
        """Give snapshot ``seq`` weight 0 from now on and take it out of the count; it stays in
        the chain (older snapshots are reconstructed through it). Its record, and None: no
        plane holds it as it was, so the error names culprits from the live weights."""
        for k, record in enumerate(self.records):
            if record is not None and record.seq == seq and record.valid:
                self.records[k] = replace(record, valid=False)
                self.count -= 1
                return record, None
        return None

    def drop_since(self, step: int) -> list[SlotRecord]:
        """Take every snapshot taken at ``step`` or later off the chain (the newest: steps only
        grow) and rewind R to the newest one kept; the valid ones dropped, oldest first."""
        self.wait_host()
        chain = self.chain()
        dropped = [k for k in chain if self.records[k].step >= step]
        if dropped != chain[len(chain) - len(dropped) :]:
            steps = [self.records[k].step for k in chain]
            raise RuntimeError(
                f"drop_since({step}): the snapshots to drop are not the newest (steps {steps}, "
                "oldest first): a chain can only be rewound from its newest end"
            )
        records = [self.records[k] for k in dropped if self.records[k].valid]
        if dropped and dropped[0] == chain[0]:
            self.records = [None] * self.window
        elif dropped:
            self._rewind(dropped)
            for k in dropped:
                self.records[k] = None
        return records

    def _rewind(self, planes: list[int]) -> None:
        for i, segs in enumerate(self.segments):
            base = self.slots[0][i]
            terms = [(self.slots[k][i], self._scale(k, i), 1.0) for k in planes]
            merge_deltas(self.code, base, base, 1.0, terms, segs)

    def _scale(self, plane: int, tensor: int) -> torch.Tensor | None:
        return self.scales[plane - 1][tensor] if self.scales else None

    def merge_into(self, out: Tensors, weights: Sequence[float]) -> None:
        """Write the weighted sum of the valid snapshots (oldest first) into ``out``, in one
        pass over R and the differences that newer snapshots need; differences older than
        every weighted snapshot are not read."""
        self.wait_host()
        chain = self.chain()
        valid = [k for k in chain if self.records[k].valid]
        if not valid:
            raise RuntimeError("no snapshot is held (none taken, or all dropped): nothing to merge")
        if len(weights) != len(valid):
            raise ValueError(f"{len(weights)} weights for {len(valid)} snapshots")
        if all(float(w) == 0 for w in weights):
            raise ValueError(f"weights={list(weights)!r}: every weight is zero")
        self._check(out)
        total, terms = merge_terms(self.records, weights)
        for i, (target, segs) in enumerate(zip(out, self.segments)):
            if self.runs[i] is not None:
                target.zero_()
            planes = [(self.slots[k][i], self._scale(k, i), coeff) for k, coeff in terms]
            merge_deltas(self.code, target, self.slots[0][i], total, planes, segs)
