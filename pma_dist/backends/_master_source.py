"""Full master tensors for export, put together from the fragments the ranks hold: each
element sent once, point to point, to the ranks that write it (``_delivery.deliver_runs``).
Backends whose shards are runs of flat elements (DeepSpeed's partitions, Megatron's main
shards) export through it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ._base import Shard
from ._delivery import deliver_runs
from ._sources import meta_state


class FragmentSource:
    """Full fp32 parameters from the master fragments ``backend.shards()`` reports, on the
    ranks that write them, and the module's ``buffers`` as they are."""

    dcp_state = None

    def __init__(
        self,
        module: nn.Module,
        backend,
        shapes: Mapping[str, tuple[int, ...]],
        buffers: Mapping[str, torch.Tensor],
        sends: Callable[[Shard], bool] | None = None,
    ) -> None:
        self.module = module
        self.backend = backend
        self.shapes = dict(shapes)
        """Every parameter's full shape, by global name."""
        self.buffers = dict(buffers)
        self.sends = sends
        """Which of this rank's shards it sends (default: all); where ranks hold replicas of
        an element, all but one of them must say no."""

    def meta(self) -> dict[str, torch.Tensor]:
        out = {
            n: torch.empty(s, dtype=torch.float32, device="meta") for n, s in self.shapes.items()
        }
        out.update(meta_state(self.buffers))
        return out

    def tensors(self, names: Iterable[str], writers=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Each full master on the ranks that write it (``writers``, per name; without, every
        rank), a meta tensor elsewhere: each holder sends its runs there. Collective."""
        from .. import _comm as comm

        pieces: dict[str, list[tuple[torch.Tensor, int]]] = {}
        for shard in self.backend.shards():
            if shard.buffer or self.sends is not None and not self.sends(shard):
                continue
            for f in shard.fragments:
                flat = shard.local.view(-1)[f.local_start : f.local_start + f.numel]
                pieces.setdefault(f.param, []).append((flat, f.start))
        group = comm.default_group()
        world = range(comm.world_size(group))
        most = comm.max_over_ranks(max((len(p) for p in pieces.values()), default=0), group)
        with torch.no_grad():
            for name in names:
                if name in self.buffers:
                    yield name, self.buffers[name].detach()
                    continue
                runs, shape = pieces.get(name, []), self.shapes[name]
                if group is None:
                    full = torch.empty(math.prod(shape), dtype=torch.float32)
                    for piece, start in runs:
                        full[start : start + piece.numel()] = piece
                    yield name, full.view(shape)
                    continue
                targets = writers[name] if writers is not None else world
                yield name, deliver_runs(runs, shape, targets, dist.get_rank(), group, most)
