"""Durable file output shared by saved state and exports: fsync, all-or-nothing replacement, and
a streaming safetensors writer.

The writer puts the header, then each tensor's bytes straight from its memory (no serialized
copy of the file), hashed as they are written, then fsynced. The files are ordinary safetensors
files (``safetensors.safe_open`` and ``from_pretrained`` read them); writing them here saves the
copy ``safetensors.torch.save_file`` makes of every tensor and the read-back a separate hash of
the file would take.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
"""safetensors dtype codes."""
DTYPES = {code: dtype for dtype, code in CODES.items()}
PIECE_BYTES = 16 << 20
"""Bytes written (and hashed beside the write) at a time."""


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to stable storage (a directory: the renames in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes) -> None:
    """``path`` holds ``data``, all or nothing, on stable storage: written aside, fsynced,
    renamed over it, and the rename fsynced."""
    temp = path.with_suffix(".tmp")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_path(path.parent)


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], sync: bool = True
) -> dict:
    """Write ``tensors`` to ``path`` in name order and (``sync``) fsync it; its size and SHA-256
    as ``{"bytes", "sha256"}``. Tensors on an accelerator are copied to the host one at a time.

    ``sync=False`` leaves the flush to the caller, who may overlap it with writing the next
    file (the disk then never idles between files)."""
    entries, offset = {}, 0
    for name in sorted(tensors):
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        span = [offset, offset + size]
        entries[name] = {
            "dtype": CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": span,
        }
        offset += size
    head = json.dumps({"__metadata__": dict(metadata), **entries}).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="pma-sha256") as hashing:
        # Hashing runs beside the writes (both release the GIL), in order, a piece at a time.
        for piece in (len(head).to_bytes(8, "little"), head):
            f.write(piece)
            digest.update(piece)
        for name in sorted(tensors):
            host = tensors[name].detach().reshape(-1).cpu()
            data = memoryview(host.view(torch.uint8).numpy())
            for start in range(0, len(data), PIECE_BYTES):
                piece = data[start : start + PIECE_BYTES]
                hashing.submit(digest.update, piece)
                f.write(piece)
        hashing.shutdown(wait=True)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    return {"bytes": 8 + len(head) + offset, "sha256": digest.hexdigest()}
