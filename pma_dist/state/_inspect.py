"""Read what a DCP checkpoint holds of a Merger's state, without a process group or the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ._format import StateHeader, unflatten


def read_entries(
    checkpoint: str | Path, prefix: str
) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The small non-tensor values under ``prefix`` (loaded) and the tensors' shapes and dtypes
    (from metadata only), keyed by the name after ``prefix``."""
    import torch.distributed.checkpoint as dcp  # imported when a checkpoint is read
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    path = Path(checkpoint)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"{path}: not a torch.distributed.checkpoint directory (no .metadata)"
        )
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    entries = {fqn: md for fqn, md in metadata.items() if fqn.startswith(prefix)}
    small = {fqn: None for fqn, md in entries.items() if isinstance(md, BytesStorageMetadata)}
    if small:
        dcp.load(small, checkpoint_id=str(path), no_dist=True)
    values = {fqn[len(prefix) :]: value for fqn, value in small.items()}
    tensors = {
        fqn[len(prefix) :]: (tuple(md.size), md.properties.dtype)
        for fqn, md in entries.items()
        if isinstance(md, TensorStorageMetadata)
    }
    return values, tensors


def read_pma_summary(checkpoint: str | Path, key: str = "pma") -> dict[str, Any]:
    """Counters, settings and slot sizes of the averaging state saved under ``key``."""
    values, tensors = read_entries(checkpoint, f"{key}.")
    if not values and not tensors:
        roots = sorted({fqn.split(".", 1)[0] for fqn in read_entries(checkpoint, "")[1]})
        raise KeyError(f"{checkpoint}: no PMA state under {key!r}; tensor roots: {roots}")
    header = StateHeader.from_flat(unflatten(values), f"{checkpoint} ({key})")
    merged = [header.records[k] for k in header.merge_order()]
    return {
        "format": header.format,
        "mode": header.mode,
        "window": header.window,
        "running_method": header.running_method,
        "num_snapshots": header.count,
        "num_skipped": header.num_skipped,
        "skip_streak": header.skip_streak,
        "buffers": len(header.buffers),
        "tensors": len(header.names or ()),
        "compression": header.compression,
        "slots": header.num_slots,
        "slot_bytes": sum(torch.Size(s).numel() * d.itemsize for s, d in tensors.values()),
        "steps_seen": header.schedule.get("steps_seen"),
        "tokens_seen": header.schedule.get("tokens_seen"),
        "history": [[r.step, r.tokens] for r in merged],
    }
