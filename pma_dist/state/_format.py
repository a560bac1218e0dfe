"""The declared layout of saved averaging state: :class:`StateHeader`, everything but the slot
tensors, in one place for the Merger, the per-rank files, offline export and ``inspect``.

Format 3, written for a compressed window: ``meta`` (``format``, ``mode``, ``window``,
``running_method``, ``compression``, ``config``, the averaged tensors' ``names`` and
``shapes``, parameters then buffers, and which of them are ``buffers``), then ``count``
(snapshots taken), ``records`` (per physical slot ``[seq, step, tokens, valid]`` or None, see
:class:`~pma_dist.core.SlotRecord`),
``num_skipped``, ``skip_streak`` (non-finite snapshots in a row), ``schedule`` and, when a
Merger has extensions (a merge monitor), ``extensions`` (their state as one JSON string, so that
DCP and the per-rank index hold it as one plain value); and, derived
from the records for readers that know format 1 only, ``head`` (where the next snapshot goes)
and ``history`` (``[step, tokens]`` of the merged snapshots, oldest first).

A compressed window (``compression`` other than ``"none"``) stores ``base`` and ``deltas.<k>``
planes (and ``scales.<k>`` for fp8) instead of ``slots.<k>``; its ``records[0]`` is the oldest
snapshot, which has no plane of its own (:class:`~pma_dist.core.CompressedWindow`).

Format 2, written for an uncompressed state (so that a pma_dist that reads formats 1 and 2
loads it), is format 3 with ``compression`` ``"none"`` or absent. Format 1 had no
records (the ring order came from ``count`` and ``head``), no skip streak and no buffers; it
still loads, its buffers then start from the live values (the loader warns).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import COMPRESSIONS
from ..core import (
    SlotRecord,
    merge_order,
    next_slot,
    records_from_lists,
    records_to_lists,
    ring_order,
)
from ..errors import PMAStateError

FORMAT_VERSION = 3
"""The newest layout: the one a compressed window is written in."""
UNCOMPRESSED_VERSION = 2
"""The layout an uncompressed state is written in (format 3 adds nothing it uses)."""
READABLE_VERSIONS = (1, 2, 3)
"""Layouts that load."""


def written_version(compression: str) -> int:
    """The format a state kept as ``compression`` is written in: the oldest that holds it."""
    return UNCOMPRESSED_VERSION if compression == "none" else FORMAT_VERSION


def check_version(version: Any, where: str) -> int:
    """``version`` as an int, or ``PMAStateError`` naming what loads."""
    if version not in READABLE_VERSIONS:
        raise PMAStateError(
            f"{where}: PMA state format {version!r}; this pma_dist reads formats "
            f"{', '.join(map(str, READABLE_VERSIONS))} (state from a newer pma_dist?)"
        )
    return int(version)


@dataclass
class StateHeader:
    """What a saved averaging state means and where its snapshots stand."""

    mode: str
    """``"window"`` or ``"running"``."""
    window: int | None
    """N, or None in running mode."""
    running_method: str | None
    """The method a running average folds with (None in window mode)."""
    config: dict[str, Any]
    """The PMAConfig it was saved with, as a dict."""
    names: list[str] | None = None
    """Averaged tensors, parameters then buffers (None where the layout carries them, as in
    per-rank files, whose fragments name every element)."""
    shapes: list[list[int]] | None = None
    """Their global shapes."""
    buffers: list[str] = field(default_factory=list)
    """Which names are module buffers."""
    count: int = 0
    """Snapshots taken."""
    records: list[SlotRecord | None] = field(default_factory=list)
    """Per physical slot, the snapshot it holds."""
    num_skipped: int = 0
    """Non-finite snapshots left out."""
    skip_streak: int = 0
    """Non-finite snapshots in a row, up to the last one."""
    schedule: dict[str, Any] = field(default_factory=dict)
    """The snapshot schedule's counters."""
    extensions: dict[str, Any] = field(default_factory=dict)
    """The JSON state of each extension (:meth:`Merger.add_extension`), by name."""
    format: int = FORMAT_VERSION
    """The layout version it was read from (written: :func:`written_version`)."""
    compression: str = "none"
    """How the window's snapshots are stored (``PMAConfig.compression``)."""

    @classmethod
    def describe(cls, config, state, names, shapes, buffers, **counters: Any) -> StateHeader:
        """The header of an averaging ``state`` kept under ``config`` (a PMAConfig) for the
        tensors ``names`` (``buffers`` among them) of global ``shapes``; ``counters`` are
        ``num_skipped``, ``skip_streak``, ``schedule`` and ``extensions``."""
        return cls(
            mode=state.mode,
            window=config.window,
            running_method=config.method if config.running else None,
            config=config.to_dict(),
            names=list(names),
            shapes=[list(s) for s in shapes],
            buffers=list(buffers),
            count=state.count,
            records=list(state.records),
            compression=config.compression,
            **counters,
        )

    @property
    def num_slots(self) -> int:
        return self.window or 1

    def merge_order(self) -> list[int]:
        """Physical slots of the valid records, oldest snapshot first."""
        return merge_order(self.records)

    def to_flat(self) -> dict[str, Any]:
        """The nested dict that ``Merger.state_dict`` and the per-rank files hold."""
        meta = {
            "format": written_version(self.compression),
            "mode": self.mode,
            "window": self.window,
            "running_method": self.running_method,
            "compression": self.compression,
            "config": dict(self.config),
            "buffers": list(self.buffers),
        }
        if self.names is not None:
            meta.update(names=list(self.names), shapes=[list(s) for s in self.shapes or []])
        merged = [self.records[k] for k in self.merge_order()]
        extensions = {"extensions": json.dumps(self.extensions)} if self.extensions else {}
        return {
            **extensions,
            "meta": meta,
            "count": self.count,
            "records": records_to_lists(self.records),
            "num_skipped": self.num_skipped,
            "skip_streak": self.skip_streak,
            "schedule": dict(self.schedule),
            "head": next_slot(self.records) if self.records else 0,
            "history": [[r.step, r.tokens] for r in merged],
        }

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], where: str) -> StateHeader:
        """Read format 1 or 2; ``PMAStateError`` naming ``where`` if it is malformed."""
        try:
            meta = flat["meta"]
            version = check_version(meta.get("format"), where)
            header = cls(
                mode=meta["mode"],
                window=meta["window"],
                running_method=meta.get("running_method"),
                config=dict(meta.get("config") or {}),
                names=list(meta["names"]) if "names" in meta else None,
                shapes=[list(s) for s in meta["shapes"]] if "shapes" in meta else None,
                buffers=list(meta.get("buffers") or []),
                count=int(flat["count"]),
                num_skipped=int(flat["num_skipped"]),
                schedule=dict(flat["schedule"]),
                format=version,
                compression=str(meta.get("compression", "none")),
            )
            if version == 1:
                header.records = _records_v1(flat, header.num_slots)
            else:
                header.records = records_from_lists(flat["records"])
                header.skip_streak = int(flat["skip_streak"])
                header.extensions = _extensions(flat.get("extensions"))
        except PMAStateError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise PMAStateError(f"{where}: PMA state header is malformed ({err!r})") from None
        if header.compression not in COMPRESSIONS:
            raise PMAStateError(
                f"{where}: PMA state compression {header.compression!r}; this pma_dist reads "
                f"{', '.join(COMPRESSIONS)}"
            )
        if len(header.records) != header.num_slots or header.count < 0 or header.skip_streak < 0:
            raise PMAStateError(
                f"{where}: {len(header.records)} slot records and count {header.count} for a "
                f"state of {header.num_slots} slots"
            )
        return header

    def check_matches(self, ours: StateHeader, where: str) -> None:
        """Raise ``PMAStateError`` unless this saved state fits a Merger whose header is
        ``ours``: same mode, window and running method, and (where names are saved) the same
        tensors, buffers aside for format 1, which saved none."""
        for key, what in (
            ("mode", "averaging mode"),
            ("window", "pma.window"),
            ("running_method", "running-mode pma.method"),
        ):
            if getattr(self, key) != getattr(ours, key):
                raise PMAStateError(
                    f"{where}: PMA state was saved with {what} = {getattr(self, key)!r}, this "
                    f"Merger has {getattr(ours, key)!r}; restart averaging or use the saved setting"
                )
        if self.names is None:
            return
        pairs = [(n, list(s)) for n, s in zip(ours.names, ours.shapes)]
        expected = [p for p in pairs if self.format > 1 or p[0] not in ours.buffers]
        saved = [(n, list(s)) for n, s in zip(self.names, self.shapes)]
        if saved != expected:
            first = next(((a, b) for a, b in zip(saved, expected) if a != b), None)
            raise PMAStateError(
                f"{where}: PMA state is for another model (or pma.average_buffers differs): "
                f"{len(saved)} tensors saved, {len(expected)} here; first difference "
                f"(saved, here): {first}"
            )


def _extensions(saved: Any) -> dict[str, Any]:
    """The extensions' states from their saved JSON string (absent: none)."""
    if saved is None:
        return {}
    extensions = json.loads(saved)
    if not isinstance(extensions, dict):
        raise ValueError(f"extensions is {type(extensions).__name__}, not a JSON object")
    return extensions


def _records_v1(flat: Mapping[str, Any], num_slots: int) -> list[SlotRecord | None]:
    """Format 1 kept a contiguous ring: ``count`` snapshots, ``head`` the next slot, and
    ``history`` the ``(step, tokens)`` of the last ``num_slots`` of them, oldest first."""
    count, history = int(flat["count"]), [tuple(h) for h in flat["history"]]
    records: list[SlotRecord | None] = [None] * num_slots
    order = ring_order(count, int(flat["head"]), num_slots) if count else []
    history = history[-len(order) :] if order else []
    if len(history) != len(order):
        raise ValueError(f"history of {len(history)} snapshots for {len(order)} filled slots")
    for i, (slot, (step, tokens)) in enumerate(zip(order, history)):
        records[slot] = SlotRecord(count - len(order) + i, int(step), int(tokens))
    return records


def unflatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys (as DCP flattens them: ``meta.config.method``) back into nested dicts."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
