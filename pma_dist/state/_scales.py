"""Where the block scales of a compressed (fp8) window go when its save is read under a layout.

A block of differences shares one scale, so its scale can move with it only when the block
moves whole: every element of one of our blocks comes from one saved block, at the same place
in a row of the same length. That holds between layouts that keep rows whole (FSDP2 and HSDP at
any world size, whole tensors, DCP), and for a DeepSpeed partition read back at its own layout;
a layout that cuts rows elsewhere (another ZeRO stage or world size) needs the differences
decoded and encoded again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..kernels import Segment
from ._runs import Copy


@dataclass(frozen=True)
class BlockCopy:
    """``count`` block scales from saved file ``file``, shard ``src_shard`` at block ``src``,
    into local shard ``dst_shard`` at block ``dst``."""

    file: int
    src_shard: int
    src: int
    dst_shard: int
    dst: int
    count: int


def merged(copies: Sequence[Copy]) -> list[Copy]:
    """``copies`` with those that continue each other on both sides (same file and shards,
    contiguous source and destination) joined: a save's fragments cut what lies together."""
    out: list[Copy] = []
    for c in sorted(copies, key=lambda c: (c.dst_shard, c.dst)):
        last = out[-1] if out else None
        if (
            last is not None
            and (last.file, last.src_shard, last.dst_shard) == (c.file, c.src_shard, c.dst_shard)
            and (last.src + last.numel, last.dst + last.numel) == (c.src, c.dst)
        ):
            out[-1] = Copy(
                c.file, c.src_shard, last.src, c.dst_shard, last.dst, last.numel + c.numel
            )
        else:
            out.append(c)
    return out


def block_copies(
    copies: Sequence[Copy],
    saved: Callable[[int, int], Sequence[Segment]],
    ours: Sequence[Sequence[Segment]],
) -> list[BlockCopy] | None:
    """The block scales that move with the elements ``copies`` move (``saved(file, shard)``
    and ``ours[shard]`` say where blocks lie), or None when some block of ours would get the
    elements of more than one saved block."""
    out = []
    for c in merged(copies):
        if c.numel == 0:
            continue
        s, d = (
            _within(saved(c.file, c.src_shard), c.src, c.numel),
            _within(ours[c.dst_shard], c.dst, c.numel),
        )
        if s is None or d is None or (s.row, s.block) != (d.row, d.block):
            return None
        row_s, col = divmod(c.src - s.start, s.row)
        row_d, col_d = divmod(c.dst - d.start, d.row)
        rows, end = divmod(col + c.numel, s.row)
        if col != col_d or col % s.block or end % s.block:
            return None
        first = col // s.block
        count = rows * s.per_row + -(-end // s.block) - first
        src = s.exps_start + row_s * s.per_row + first
        out.append(
            BlockCopy(
                c.file,
                c.src_shard,
                src,
                c.dst_shard,
                d.exps_start + row_d * d.per_row + first,
                count,
            )
        )
    return out


def _within(segments: Sequence[Segment], start: int, numel: int) -> Segment | None:
    """The segment holding elements ``[start, start + numel)`` whole, or None."""
    for seg in segments:
        if seg.start <= start and start + numel <= seg.start + seg.numel:
            return seg
    return None
