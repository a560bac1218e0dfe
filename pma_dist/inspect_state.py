"""Read what a DCP checkpoint holds of a Merger's state, without a process group or the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata


def read_pma_summary(checkpoint: str | Path, key: str = "pma") -> dict[str, Any]:
    """Counters, settings and slot sizes of the averaging state saved under ``key``.

    Reads the checkpoint's metadata and its small non-tensor entries only; no tensor data.
    """
    path = Path(checkpoint)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"{path}: not a torch.distributed.checkpoint directory (no .metadata)"
        )
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{key}."
    entries = {fqn: md for fqn, md in metadata.items() if fqn.startswith(prefix)}
    if not entries:
        roots = sorted({fqn.split(".", 1)[0] for fqn in metadata})
        raise KeyError(f"{path}: no PMA state under {key!r}; top-level keys: {roots}")
    small = {fqn: None for fqn, md in entries.items() if isinstance(md, BytesStorageMetadata)}
    dcp.load(small, checkpoint_id=str(path), no_dist=True)
    values = {fqn[len(prefix) :]: value for fqn, value in small.items()}
    tensors = {fqn: md for fqn, md in entries.items() if isinstance(md, TensorStorageMetadata)}
    slot_bytes = sum(md.size.numel() * md.properties.dtype.itemsize for md in tensors.values())
    meta = {k[len("meta.") :]: v for k, v in values.items() if k.startswith("meta.")}
    return {
        "mode": meta.get("mode"),
        "window": meta.get("window"),
        "running_method": meta.get("running_method"),
        "num_snapshots": values.get("count"),
        "num_skipped": values.get("num_skipped"),
        "tensors": len(meta.get("names", [])),
        "slots": len({fqn.split(".")[2] for fqn in tensors}),
        "slot_bytes": slot_bytes,
        "steps_seen": values.get("schedule.steps_seen"),
        "tokens_seen": values.get("schedule.tokens_seen"),
        "history": values.get("history"),
    }
