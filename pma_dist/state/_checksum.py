"""The bit checksum of saved slot tensors: per-rank files, their chunks and the replica audit."""

from __future__ import annotations

import torch

from ..kernels import chunks


def bit_checksum(tensor: torch.Tensor) -> int:
    """Sum of the tensor's bits read as integers: equal exactly when (almost surely) the
    contents are; cheap enough to check a whole state on load."""
    if tensor.numel() == 0:
        return 0
    kinds = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    bits = tensor.detach().contiguous().view(kinds[tensor.element_size()]).view(-1)
    total = torch.zeros((), dtype=torch.int64, device=tensor.device)
    for part in chunks(bits.numel()):
        total += bits[part].sum(dtype=torch.int64)
    return int(total.item())
