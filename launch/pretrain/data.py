"""Byte-level text data: the embedded default corpus (the Python standard library's source) or
any folder of text files, split deterministically into train and held-out parts.

Tokens are ByT5's: byte ``b`` is id ``b + 3`` (0-2 are pad, eos, unk), so the exported model's
``ByT5Tokenizer`` encodes text exactly as training saw it.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

BYTE_OFFSET = 3
"""ByT5 reserves ids 0-2; byte b is token b + 3."""


def corpus_files(path: str | None) -> tuple[Path, list[Path]]:
    """The corpus root and its files, sorted; ``None`` is the standard library's ``*.py``."""
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
    else:
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {path}: no such directory")
        files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return root, files


def load_corpus(path: str | None, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the train and held-out parts. A file is held out when its path relative to
    the root hashes to 0 mod 20; files with NUL bytes (binaries) are skipped. Each part stops
    taking files at its share of ``max_bytes`` (95% and 5%)."""
    root, files = corpus_files(path)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    room = {False: int(max_bytes * 0.95), True: max(int(max_bytes * 0.05), 1)}
    for file in files:
        if all(r <= 0 for r in room.values()):
            break
        held = zlib.crc32(str(file.relative_to(root)).encode()) % 20 == 0
        if room[held] <= 0:
            continue
        data = file.read_bytes()
        if not data or b"\0" in data:
            continue
        parts[held].append(data)
        room[held] -= len(data)
    train, held = parts[False], parts[True]
    if not train or not held:
        where = path if path is not None else f"(the standard library at {root})"
        raise ValueError(
            f"--data {where}: {len(train)} train and {len(held)} held-out text files found; "
            "need text (non-binary) files in both parts (about 20 files or more)"
        )
    return _ids(train), _ids(held)


def _ids(parts: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long() + BYTE_OFFSET


class TrainBatches:
    """Random windows from this rank's share of the train ids (its contiguous 1/world part),
    in an order fixed by the seed and rank, and resumable by step."""

    def __init__(
        self, ids: torch.Tensor, seq_len: int, batch: int, rank: int, world: int, seed: int
    ) -> None:
        share = len(ids) // world
        self.ids = ids[rank * share : (rank + 1) * share]
        if len(self.ids) <= seq_len + 1:
            raise ValueError(
                f"each rank's share of the corpus ({len(self.ids)} tokens) is shorter than "
                "one sequence"
            )
        self.seq_len, self.batch, self.seed, self.rank = seq_len, batch, seed, rank

    def at(self, step: int) -> torch.Tensor:
        """The batch of ``step``: ``(batch, seq_len + 1)`` ids."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + step)
        starts = torch.randint(0, len(self.ids) - self.seq_len - 1, (self.batch,), generator=g)
        return torch.stack([self.ids[s : s + self.seq_len + 1] for s in starts.tolist()])


def eval_batches(
    ids: torch.Tensor, seq_len: int, batch: int, count: int, rank: int, world: int
) -> list[torch.Tensor]:
    """Fixed held-out batches: evenly spaced windows, every rank its own ``count`` of them."""
    total = count * world * batch
    stride = max((len(ids) - seq_len - 1) // total, 1)
    windows = [ids[(i * stride) % (len(ids) - seq_len - 1) :][: seq_len + 1] for i in range(total)]
    mine = windows[rank * count * batch : (rank + 1) * count * batch]
    return [torch.stack(mine[i * batch : (i + 1) * batch]) for i in range(count)]
