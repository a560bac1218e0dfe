"""What PMA costs one rank of a large job, worked out by the real layout code: ``pma-dist plan``.

One rank of ``world`` joins PyTorch's fake process group (collectives return at once, nothing
is sent), builds the model on the meta device from a config (shipped ones or a ``config.json``;
nothing is downloaded), shards it with FSDP2 (HSDP with ``replicas`` replica groups) exactly as
a training program does, and builds a Merger on it: the shard layout, the padding and the slot
sizes are the ones a real run of that size would get, in seconds and without memory.

The interval suggestion follows the paper's scaling of the snapshot interval V with model size
(about 4B tokens at 7B total parameters, 8B at 13B, 80B at 100B; log-linear in between and,
beyond 100B, along the last segment).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SHIPPED = ("llama3-70b", "llama3-405b", "mixtral-8x22b", "deepseek-v3")
"""Architectures whose configs ship with pma_dist (``pma_dist/tools/model_configs``)."""
INTERVAL_ANCHORS = ((7e9, 4e9), (13e9, 8e9), (100e9, 80e9))
"""(total parameters, snapshot interval in tokens) read off the paper's scaling runs."""


@dataclass(frozen=True)
class Plan:
    """Per-rank figures for one rank of a sharded job; bytes are exact for that rank."""

    model: str
    """The architecture name or config path."""
    world: int
    """Ranks in the job."""
    replicas: int
    """HSDP replica groups (1: plain FSDP)."""
    rank: int
    """The rank simulated (rank 0 holds the most under FSDP2's row chunking)."""
    window: int | None
    """Snapshots held (None: running mode, one slot)."""
    offload: str
    """Where the slots live: ``"none"`` (beside the parameters) or ``"cpu"``."""
    compression: str
    """How the window stores its snapshots (``PMAConfig.compression``)."""
    experts_dim: int
    """The dimension grouped-expert tensors are sharded on."""
    total_params: int
    """Parameters of the whole model."""
    local_params: int
    """Parameter elements this rank holds (its shards, padding excluded)."""
    state_bytes_per_rank: int
    """Averaging-state bytes this rank holds (all slots in fp32, or a compressed window's base,
    differences and scales)."""
    snapshot_bytes_per_rank: int
    """Bytes one snapshot reads and writes on this rank (window: read the shard, write a slot;
    running: read the shard and the slot, write the slot)."""
    resume_read_bytes_per_rank: int
    """Bytes of averaging state a DCP resume at the same layout reads on this rank (only the
    chunks that overlap its slots)."""
    export_peak_bytes_per_rank: int
    """Peak memory of an HF export on a writing rank: the largest full tensor in fp32 plus one
    output file of ``max_shard_size``."""
    suggested_interval_tokens: int
    """The snapshot interval V the paper's scaling suggests for ``total_params``."""


def suggested_interval_tokens(total_params: float) -> int:
    """V for a model of ``total_params`` (all experts counted), log-linear in the anchors."""
    points = [(math.log(p), math.log(v)) for p, v in INTERVAL_ANCHORS]
    x = math.log(total_params)
    segment = 0 if x <= points[1][0] else 1
    (x0, y0), (x1, y1) = points[segment], points[segment + 1]
    return int(round(math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0)), -8))


def model_config(model: str) -> dict[str, Any]:
    """A shipped architecture's config, or the ``config.json`` at path ``model``."""
    if model in SHIPPED:
        text = resources.files(__package__).joinpath(f"model_configs/{model}.json").read_text()
        return json.loads(text)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"--model {model!r}: not a shipped architecture ({', '.join(SHIPPED)}) nor a "
            "config.json (or a directory holding one)"
        )
    return json.loads(path.read_text())


@contextmanager
def fake_world(rank: int, world: int) -> Iterator[None]:
    """Be rank ``rank`` of ``world`` in PyTorch's fake process group for the block."""
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as err:
        raise RuntimeError(
            f"PyTorch {torch.__version__} has no fake process group at "
            "torch.testing._internal.distributed.fake_pg (a private module that registers the "
            "'fake' backend): pma-dist plan cannot simulate ranks with this version"
        ) from err
    if dist.is_initialized():
        raise RuntimeError("pma-dist plan needs a process with no process group yet")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def meta_model(config: dict[str, Any]) -> nn.Module:
    """The causal LM ``config`` describes, on the meta device, fp32 (FSDP2's sharded dtype)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as err:
        raise RuntimeError("pma-dist plan builds models with transformers: pip install "
                           "'pma-dist[hf]'") from err  # fmt: skip
    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf_config = AutoConfig.for_model(config["model_type"], **settings)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)


@contextmanager
def simulated_merger(
    model: str,
    world: int,
    replicas: int,
    rank: int,
    window: int | None,
    experts_dim: int,
    compression: str = "none",
) -> Iterator[Any]:
    """A Merger on ``model`` (see :func:`model_config`) on the meta device, sharded with FSDP2
    as rank ``rank`` of ``world`` shards it (HSDP with ``replicas`` replica groups), inside the
    fake process group: the real layout for that rank, in seconds and without memory."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from ..config import PMAConfig
    from ..merger import Merger
    from ._sharding import fully_shard_blocks

    config = model_config(model)
    with fake_world(rank, world):
        module = meta_model(config)
        shape = (replicas, world // replicas) if replicas > 1 else (world,)
        names = ("replicate", "shard") if replicas > 1 else ("shard",)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)

        def placement(param: nn.Parameter) -> Shard:
            return Shard(experts_dim if param.ndim == 3 else 0)

        fully_shard_blocks(module, module.model.layers, mesh, shard_placement_fn=placement)
        if next(module.parameters()).device_mesh.get_coordinate() != mesh.get_coordinate():
            raise RuntimeError(
                "PyTorch gave the model the device mesh of another rank simulated earlier in "
                "this process (equal meshes are shared): simulate one rank per process"
            )
        # Slots stay on the meta device whatever the offload setting: their bytes are the same.
        config = PMAConfig(window=window, interval_steps=1, compression=compression)
        yield Merger(module, None, config)


def plan(
    model: str,
    world: int,
    *,
    replicas: int = 1,
    rank: int = 0,
    window: int | None = 10,
    offload: str = "none",
    max_shard_size: int = 5 * 10**9,
    experts_dim: int = 1,
    compression: str = "none",
) -> Plan:
    """The per-rank figures of a Merger on ``model`` sharded over ``world`` ranks. Three-
    dimensional (grouped-expert) tensors are sharded on ``experts_dim`` (1: within each
    expert, as MoE runs do once ranks outnumber experts; 0: by expert, FSDP2's default)."""
    if world < 1 or replicas < 1 or world % replicas or not 0 <= rank < world:
        raise ValueError(
            f"--world {world} --replicas {replicas} --rank {rank}: need world >= 1 divisible by "
            "replicas, and 0 <= rank < world"
        )
    simulated = simulated_merger(model, world, replicas, rank, window, experts_dim, compression)
    with simulated as merger:
        shards = [s for s in merger.backend.shards() if not s.buffer]
        real = [sum(f.numel for f in s.fragments) for s in shards]
        slot = sum(real) * 4
        live = sum(n * s.local.element_size() for n, s in zip(real, shards))
        reads = 1 if window else 2
        moved, resumed = live + slot * reads, slot * (window or 1)
        if compression != "none":
            written = (merger.state_bytes - slot) // max(window - 1, 1)  # one difference
            moved, resumed = live + 2 * slot + written, merger.state_bytes
        total = sum(math.prod(s.global_shape) for s in shards)
        largest = max(math.prod(s.global_shape) for s in shards) * 4
        return Plan(
            model=model,
            world=world,
            replicas=replicas,
            rank=rank,
            window=window,
            offload=offload,
            compression=compression,
            experts_dim=experts_dim,
            total_params=total,
            local_params=sum(real),
            state_bytes_per_rank=merger.state_bytes,
            snapshot_bytes_per_rank=moved,
            resume_read_bytes_per_rank=resumed,
            export_peak_bytes_per_rank=largest + max_shard_size,
            suggested_interval_tokens=suggested_interval_tokens(total),
        )


def describe(result: Plan) -> str:
    """``result`` as aligned lines for a terminal."""

    def size(n: float) -> str:
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if n < 1000 or unit == "TB":
                return f"{n:.3g} {unit}"
            n /= 1000
        return ""

    rows = asdict(result)
    return "\n".join(
        f"{key:28} {size(value) if key.endswith('bytes_per_rank') else value}"
        for key, value in rows.items()
    )
