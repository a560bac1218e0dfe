"""Where a tensor's fp8 blocks lie: its rows cut into blocks of :data:`BLOCK` elements
(:class:`Segment`), the shape of its plane of block exponents, and the pieces the torch passes
of ``_codes`` work on so that their temporaries stay in cache."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

BLOCK = 128
"""Elements per fp8 block along a row."""
CHUNK_NUMEL = 1 << 18
"""Elements per chunk of the torch passes (their temporaries stay in cache)."""


@dataclass(frozen=True)
class Segment:
    """``rows`` rows of ``row`` elements from flat offset ``start`` of a tensor, cut into blocks
    of ``block`` elements along each row (the last block of a row may be shorter); their
    exponents start at ``exps_start`` of the tensor's exponent plane."""

    start: int
    rows: int
    row: int
    block: int
    exps_start: int

    @property
    def numel(self) -> int:
        return self.rows * self.row

    @property
    def per_row(self) -> int:
        return -(-self.row // self.block)

    @property
    def blocks(self) -> int:
        return self.rows * self.per_row


def segments(
    shape: Sequence[int], runs: Sequence[tuple[int, int]] | None, block: int
) -> tuple[Segment, ...]:
    """The rows of a tensor of ``shape``: its last dimension (a 0-d tensor: one element), or,
    for a padded tensor, each run ``(start, numel)`` of real elements as one row."""
    if runs is not None:
        out, exps = [], 0
        for start, numel in runs:
            if numel:
                out.append(Segment(start, 1, numel, block, exps))
                exps += -(-numel // block)
        return tuple(out)
    numel = math.prod(shape)
    if numel == 0:
        return ()
    row = shape[-1] if len(shape) else 1
    return (Segment(0, numel // row, row, block, 0),)


def exps_shape(
    shape: Sequence[int], runs: Sequence[tuple[int, int]] | None, block: int
) -> tuple[int, ...]:
    """The shape of a tensor's exponent plane: like the tensor with its last dimension counted
    in blocks (so a DCP checkpoint lays it out like the parameter), or flat for runs."""
    if runs is not None:
        return (sum(s.blocks for s in segments(shape, runs, block)),)
    if not len(shape):
        return () if block == 1 else (1,)
    return (*shape[:-1], -(-shape[-1] // block))


def pieces(segs: Sequence[Segment]) -> Iterator[Segment]:
    """``segs`` cut into pieces of about :data:`CHUNK_NUMEL` elements at row or block bounds (a
    long row becomes rows of whole blocks), so that torch's temporaries stay small."""
    for seg in segs:
        if seg.row <= CHUNK_NUMEL:
            rows = max(1, CHUNK_NUMEL // max(seg.row, 1))
            for first in range(0, seg.rows, rows):
                count = min(rows, seg.rows - first)
                start, exps = seg.start + first * seg.row, seg.exps_start + first * seg.per_row
                yield Segment(start, count, seg.row, seg.block, exps)
            continue
        width = CHUNK_NUMEL // seg.block * seg.block
        for r in range(seg.rows):
            for at in range(0, seg.row, width):
                start = seg.start + r * seg.row + at
                exps = seg.exps_start + r * seg.per_row + at // seg.block
                yield Segment(start, 1, min(width, seg.row - at), seg.block, exps)


def exps_of(exps: torch.Tensor | None, piece: Segment) -> torch.Tensor | None:
    """The block exponents of ``piece`` in a flat exponent plane (None without one)."""
    return None if exps is None else exps[piece.exps_start : piece.exps_start + piece.blocks]
