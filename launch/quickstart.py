"""FSDP2 + PMA in one file: a byte-level transformer trained at constant learning rate on the
Python standard library's source, with the held-out loss of the live and the merged model.

    torchrun --standalone --nproc-per-node 2 launch/quickstart.py

Runs on CPU (gloo) or GPUs (NCCL) unchanged.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from pma_dist import Merger, PMAConfig


def load_corpus(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the stdlib's .py files; a file goes to held-out when its path hashes to 0 mod 20."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held_out, size = [], [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or size > limit:
            continue
        data = path.read_bytes()
        size += len(data)
        split = held_out if zlib.crc32(str(path.relative_to(root)).encode()) % 20 == 0 else train
        split.append(data)
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held_out)


class ByteLM(nn.Module):
    def __init__(self, dim: int, layers: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 4, 4 * dim, 0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=tokens.device)
        x = self.embed(tokens) + self.pos[:seq]
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def windows(data: torch.Tensor, count: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (count,), generator=generator)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def loss_on(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    total = torch.stack([loss_on(model, b) for b in batches]).mean()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)
    train, held = load_corpus(limit=8_000_000)
    torch.manual_seed(0)
    model = ByteLM(args.dim, args.layers, args.seq).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    tokens_per_step = args.batch * args.seq * world
    config = PMAConfig(method="sma", window=10, interval_tokens=5 * tokens_per_step)
    merger = Merger(model, optimizer, config)

    generator = torch.Generator().manual_seed(1 + rank)
    eval_batches = [
        windows(held, args.batch, args.seq, torch.Generator().manual_seed(99 + rank + 7 * i)).to(
            device
        )
        for i in range(4)
    ]
    if rank == 0:
        print(
            f"{world} ranks on {device.type}: {len(train):,} train / {len(held):,} held-out bytes, "
            f"{tokens_per_step:,} tokens per step; snapshot every {config.interval_tokens:,} tokens"
        )
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = loss_on(model, windows(train, args.batch, args.seq, generator).to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        merger.step(tokens=tokens_per_step)
        if step % args.eval_every == 0 or step == args.steps:
            live = held_out_loss(model, eval_batches)
            merged = {}
            for method in ("sma", "wma", "ema"):
                with merger.swapped(method):
                    merged[method] = held_out_loss(model, eval_batches)
            if rank == 0:
                pma = "  ".join(f"{m} {v:.4f}" for m, v in merged.items())
                print(
                    f"step {step:4d}  {time.perf_counter() - start:6.1f}s  "
                    f"train {loss.item():.4f}  "
                    f"held-out: live {live:.4f}  PMA[{merger.window_size} snapshots] {pma}"
                )
    dist.barrier()  # ranks leave together (docs/semantics.md, "Exit")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
