"""A tiny causal transformer with deliberately awkward parameter shapes, and its training step.

Dimensions (vocab 37, ffn 41, a 3-element parameter) do not divide by 2 or 4, so FSDP2 shards
are uneven and some ranks hold empty shards: the cases a shard-local average must get right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HEADS, FFN, SEQ, LAYERS = 37, 24, 2, 41, 12, 2
GLOBAL_BATCH = 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.norm2 = nn.LayerNorm(DIM)
        self.ff = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(), nn.Linear(FFN, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.mix = nn.Parameter(torch.ones(3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) * self.mix.mean()


class BufferedLM(TinyLM):
    """TinyLM with a persistent floating buffer that training moves outside the optimizer (like
    the expert bias of auxiliary-loss-free MoE balancing), an integer buffer and a
    non-persistent one (neither of which is ever averaged)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("balance", torch.zeros(5))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def update_buffers(self, step: int) -> None:
        """Move the buffers the way a balancing rule would: by a step-dependent amount."""
        with torch.no_grad():
            self.balance.add_(torch.linspace(-1, 1, 5, device=self.balance.device) * (step + 1))
            self.seen.add_(1)
            self.scratch.add_(1.0)


def make_buffered_model(seed: int = 0) -> BufferedLM:
    torch.manual_seed(seed)
    return BufferedLM()


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyLM:
    """The same initial weights on every rank for a given seed."""
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


def shard_fsdp2(model: TinyLM, world_size: int, device_type: str = "cpu") -> TinyLM:
    """FSDP2 per block and at the root over a 1-D mesh."""
    from pma_dist.testing import shard_blocks

    return shard_blocks(model, model.blocks, world_size, device_type)


def batch(step: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's slice of the global batch of ``step`` (same global batch at any world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    per_rank = GLOBAL_BATCH // world_size
    return tokens[rank * per_rank : (rank + 1) * per_rank]


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int, world_size: int
) -> float:
    """One forward/backward/optimizer step on the deterministic data; the local loss."""
    loss = loss_of(model, batch(step, rank, world_size))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to a full tensor (collective under FSDP2), detached, cloned."""
    from torch.distributed.tensor import DTensor

    from pma_dist.backends import canonical_name

    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[canonical_name(name)] = full.detach().clone()
    return out


def counting_batch(step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """A learnable task (each token is the previous plus one), for runs that must converge."""
    g = torch.Generator().manual_seed(2000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    tokens = (start + torch.arange(SEQ + 1)) % VOCAB
    per_rank = GLOBAL_BATCH // world_size
    return tokens[rank * per_rank : (rank + 1) * per_rank]


def load_full_state(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy full ``weights`` (by parameter name) into the model's parameters, FSDP2-sharded
    (each rank keeps its shard of them) or whole."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            value = weights[name].to(p.dtype)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(value, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(value)
