"""Global names of a DeepSpeed engine's parameters: the module's own names, with DeepSpeed MoE
experts renumbered over the expert-parallel ranks (``ep_rank * num_local_experts + local_id``)
so that every expert has one name on every rank, held there or not."""

from __future__ import annotations

import re

from torch import nn

from ._base import canonical_name


def expert_names(module: nn.Module) -> dict[str, tuple[int, list[str]]]:
    """Each local DeepSpeed MoE expert parameter's name to this rank's expert-parallel rank and
    the parameter's global name on every expert-parallel rank (index r: its name there).

    Experts are numbered ``ep_rank * num_local_experts + local_id``; every expert-parallel rank
    builds its experts alike, so a rank can name (and shape) the experts it does not hold."""
    try:
        from deepspeed.moe.experts import Experts
        from deepspeed.utils import groups
    except ImportError:
        return {}
    names = {}
    for prefix, sub in module.named_modules():
        if not isinstance(sub, Experts):
            continue
        group_name = next(sub.parameters()).group_name
        ep_rank = groups._get_expert_parallel_rank(group_name)
        ep_size = groups._get_expert_parallel_world_size(group_name)
        count = sub.num_local_experts
        for name, _ in sub.named_parameters():
            match = re.match(r"deepspeed_experts\.(\d+)\.(.*)", name)
            if match:
                local_id, rest = int(match.group(1)), match.group(2)
                full = f"{prefix}.{name}" if prefix else name
                every = [
                    f"{prefix}.deepspeed_experts.{r * count + local_id}.{rest}"
                    for r in range(ep_size)
                ]
                names[full] = (ep_rank, every)
    return names


def expert_renaming(module: nn.Module) -> dict[str, str]:
    """Local expert parameter names to global ones for every DeepSpeed MoE layer in ``module``."""
    return {local: every[ep_rank] for local, (ep_rank, every) in expert_names(module).items()}


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(param) -> canonical global name`` for the engine's module."""
    renames = expert_renaming(module)
    return {id(p): canonical_name(renames.get(n, n)) for n, p in module.named_parameters()}
