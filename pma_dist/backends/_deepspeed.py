"""Backend for DeepSpeed engines: averages the fp32 master partitions each rank's ZeRO
optimizer owns, never the bf16/fp16 working copies, with no communication.

Shards are the optimizer's flat fp32 partitions (one per param group, or per ZeRO-3 sub-group),
so a snapshot is one fused copy or lerp over a handful of large tensors. Fragments map each
partition back to parameter elements (padding excluded) for layout-independent checkpoints.
After a swap writes the master, ``end_write`` pushes it to the working parameters the way the
optimizer's own step does: ``update_lp_params()`` for ZeRO 1/2, a release of every gathered
parameter plus a copy into the partitioned working copies for ZeRO-3.

Names are the module's parameter names with DeepSpeed MoE experts renumbered globally
(``ep_rank * num_local_experts + local_id``), so that every expert has one name across ranks.

The layout is read from private optimizer attributes (``round_robin_bit16_offsets``,
``grad_position``, ``fp32_partitioned_groups_flat``, ``_hp_mapping``), which DeepSpeed changes
between minor versions, so only the tested range is accepted
(``_deepspeed_probe.SUPPORTED_VERSIONS``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ._base import Fragment, Shard, canonical_name
from ._deepspeed_names import expert_names, parameter_names
from ._deepspeed_probe import check_version, is_deepspeed_engine, zero_optimizer_of
from ._master_source import FragmentSource
from ._params import buffer_shards


class DeepSpeedBackend:
    """Shards of a ``DeepSpeedEngine``: the fp32 partitions of its ZeRO optimizer."""

    def __init__(self, module: nn.Module, zero_optimizer, *, buffers: bool = True) -> None:
        check_version()
        self.optimizer = zero_optimizer
        self._module = module
        self._buffers = buffers
        self._names = parameter_names(module)
        if hasattr(self.optimizer, "fp32_partitioned_groups_flat"):
            self.kind = "zero3"
        elif hasattr(self.optimizer, "single_partition_of_fp32_groups"):
            self.kind = "zero12"
            if getattr(self.optimizer, "round_robin_gradients", False):
                self._check_round_robin_layout()
        elif hasattr(self.optimizer, "fp32_groups_flat_partition"):
            self.kind = "bf16"
        else:
            raise TypeError(
                f"DeepSpeedBackend: optimizer {type(self.optimizer).__name__} keeps no fp32 "
                "master partition (ZeRO stage 0 without bf16); average the module with "
                "Merger(engine.module, optimizer, config) instead"
            )

    def _check_round_robin_layout(self) -> None:
        """The flat layout is read from ``round_robin_bit16_*``; refuse if it is missing."""
        if not hasattr(self.optimizer, "round_robin_bit16_offsets"):
            raise TypeError(
                "DeepSpeedBackend: round_robin_gradients is on but this DeepSpeed version "
                "exposes no round_robin_bit16_offsets; set round_robin_gradients to false"
            )

    def _name(self, param: torch.Tensor) -> str:
        return self._names[id(param)]

    def shards(self) -> list[Shard]:
        if self.kind == "zero3":
            masters = list(self._zero3_shards())
        elif self.kind == "zero12":
            masters = list(self._zero12_shards())
        else:
            masters = list(self._bf16_shards())
        return masters + buffer_shards(self._module, self._buffers)

    def _zero12_shards(self) -> Iterator[Shard]:
        zo = self.optimizer
        for i, flat in enumerate(zo.single_partition_of_fp32_groups):
            group = zo.real_dp_process_group[i]
            rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
            size = zo.bit16_groups_flat[i].numel() // world
            lo, hi = rank * size, (rank + 1) * size
            fragments = []
            for p, offset in zip(zo.round_robin_bit16_groups[i], zo.round_robin_bit16_offsets[i]):
                start, end = max(offset, lo), min(offset + p.numel(), hi)
                if start < end:
                    fragments.append(
                        Fragment(
                            self._name(p), tuple(p.shape), start - offset, end - start, start - lo
                        )
                    )
            yield Shard(f"zero.group{i}", flat, (world * size,), None, tuple(fragments))

    def _bf16_shards(self) -> Iterator[Shard]:
        zo = self.optimizer
        for i, flat in enumerate(zo.fp32_groups_flat_partition):
            fragments = []
            for p in zo.bf16_groups[i]:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                fragments.append(
                    Fragment(self._name(p), tuple(p.shape), lp.start, lp.numel, hp.start)
                )
            yield Shard(f"bf16.group{i}", flat, tuple(flat.shape), None, tuple(fragments))

    def _zero3_shards(self) -> Iterator[Shard]:
        zo = self.optimizer
        for sg, params in enumerate(zo.fp16_groups):
            flat = zo.fp32_partitioned_groups_flat[sg]
            fragments = []
            for p in params:
                _, local_start, part = zo.grad_position[zo.get_param_id(p)]
                start = dist.get_rank(group=p.ds_process_group) * part
                valid = max(0, min(part, p.ds_numel - start))
                if valid:
                    fragments.append(
                        Fragment(self._name(p), tuple(p.ds_shape), start, valid, local_start)
                    )
            yield Shard(f"zero3.subgroup{sg}", flat, tuple(flat.shape), None, tuple(fragments))

    def master_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every averaged parameter's global name and full shape, from this rank alone: each
        rank's ZeRO groups list every parameter of the model (partitioned or not), and the
        experts other expert-parallel ranks hold are named after this rank's own."""
        kind_groups = {"zero3": "fp16_groups", "zero12": "round_robin_bit16_groups"}
        groups = getattr(self.optimizer, kind_groups.get(self.kind, "bf16_groups"))
        local = {id(p): n for n, p in self._module.named_parameters()}
        experts = expert_names(self._module)
        shapes: dict[str, tuple[int, ...]] = {}
        for params in groups:
            for p in params:
                shape = tuple(getattr(p, "ds_shape", p.shape))
                if math.prod(shape) == 0:
                    continue
                _, every = experts.get(local[id(p)], (0, [self._name(p)]))
                shapes.update((canonical_name(name), shape) for name in every)
        return shapes

    def source(self) -> FragmentSource:
        """The engine's full fp32 masters (and buffers), for export: experts under global
        ids (``ep_rank * num_local_experts + local_id``)."""
        params = _param_names(self._module)
        buffers = {
            canonical_name(n): b for n, b in self._module.state_dict().items() if n not in params
        }
        return FragmentSource(self._module, self, self.master_shapes(), buffers)

    def begin_write(self) -> None:
        pass

    @torch.no_grad()
    def end_write(self) -> None:
        """Push the fp32 master to the working parameters on every rank. Collective."""
        zo = self.optimizer
        if self.kind in ("zero12", "bf16"):
            zo.update_lp_params()
            return
        zo.checkpoint_event_prologue()
        for sg in range(len(zo.fp16_groups)):
            zo._reassign_or_swap_out_partitioned_parameters(sg)
        zo.checkpoint_event_epilogue()


def _param_names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters(remove_duplicate=False)}


def backend_for(model: nn.Module, optimizer, buffers: bool) -> DeepSpeedBackend | None:
    """A DeepSpeed engine, or a module whose optimizer is (or wraps) a ZeRO optimizer."""
    if is_deepspeed_engine(model):
        return DeepSpeedBackend(model.module, model.optimizer, buffers=buffers)
    zero = zero_optimizer_of(optimizer)
    return DeepSpeedBackend(model, zero, buffers=buffers) if zero is not None else None
