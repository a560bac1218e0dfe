"""DeepSpeed engines on CPU for the tests: configs, a training step, full fp32 references."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from tests.support.fragments import assembled  # noqa: E402
from tests.support.models import batch, loss_of, make_buffered_model, make_model  # noqa: E402

MICRO_BATCH = 4


def ds_config(
    stage: int,
    world_size: int,
    pma: dict | None = None,
    *,
    grad_accum_dtype: str | None = None,
    **zero,
) -> dict:
    """bf16 ZeRO config for ``world_size`` ranks with micro-batches of the shared test data.

    ``grad_accum_dtype="fp32"`` at stage 1 selects DeepSpeed's ``BF16_Optimizer``."""
    config = {
        "train_micro_batch_size_per_gpu": 8 // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, **zero},
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
    }
    if "offload_optimizer" in zero:
        config["zero_force_ds_cpu_optimizer"] = False
    if grad_accum_dtype is not None:
        config["data_types"] = {"grad_accum_dtype": grad_accum_dtype}
    if pma is not None:
        config["pma"] = pma
    return config


def make_engine(
    stage: int, world_size: int, pma: dict | None, seed: int = 0, buffered: bool = False, **zero
):
    """A bf16 DeepSpeed engine on the shared tiny LM (with buffers: ``BufferedLM``), through
    ``pma_dist.deepspeed``."""
    from pma_dist.deepspeed import initialize

    model = make_buffered_model(seed) if buffered else make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    engine, *_ = initialize(
        model=model, optimizer=optimizer, config=ds_config(stage, world_size, pma, **zero)
    )
    return engine


def engine_step(engine, step: int, rank: int, world_size: int) -> float:
    loss = loss_of(engine, batch(step, rank, world_size).to(engine.device))
    engine.backward(loss)
    engine.step()
    return loss.item()


def full_fp32(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master value (collective), keyed like the Merger names."""
    from deepspeed.utils import safe_get_full_fp32_param

    from pma_dist.backends._deepspeed_names import parameter_names

    names = parameter_names(engine.module)
    return {
        names[id(p)]: safe_get_full_fp32_param(p).detach().clone()
        for p in engine.module.parameters()
    }


def full_working(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full working (bf16) value as the forward sees it (collective)."""
    import deepspeed

    from pma_dist.backends._deepspeed_names import parameter_names

    names = parameter_names(engine.module)
    out = {}
    for p in engine.module.parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[names[id(p)]] = p.detach().clone()
    return out


class MoENet(torch.nn.Module):
    """Embedding, one DeepSpeed MoE layer of 4 experts with expert parallelism, and a head."""

    def __init__(self, ep_size: int) -> None:
        from deepspeed.moe.layer import MoE

        from tests.support.models import DIM, VOCAB

        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        expert = torch.nn.Sequential(
            torch.nn.Linear(DIM, 13), torch.nn.GELU(), torch.nn.Linear(13, DIM)
        )
        self.moe = MoE(
            hidden_size=DIM,
            expert=expert,
            num_experts=4,
            ep_size=ep_size,
            k=1,
            min_capacity=4,
            capacity_factor=2.0,
            drop_tokens=False,
        )
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        y, self.aux_loss, _ = self.moe(x)
        return self.head(x + y)


def make_moe_engine(world_size: int, ep_size: int, pma: dict, seed: int = 0):
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from pma_dist.deepspeed import initialize

    torch.manual_seed(seed)
    model = MoENet(ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "params"}
    )
    optimizer = torch.optim.AdamW(groups, lr=2e-2)
    engine, *_ = initialize(model=model, optimizer=optimizer, config=ds_config(2, world_size, pma))
    return engine


def moe_step(engine, step: int, rank: int, world_size: int) -> float:
    loss = loss_of(engine, batch(step, rank, world_size))
    engine.backward(loss + 0.01 * engine.module.aux_loss)
    engine.step()
    return loss.item()


def gathered_fp32(engine) -> dict[str, torch.Tensor]:
    """Full fp32 values of every parameter under global names, merged over all ranks; a name
    held by several ranks (expert-data-parallel replicas) must hold the same values."""
    from pma_dist import _comm as comm

    merged: dict[str, torch.Tensor] = {}
    for part in comm.gather_objects(full_fp32(engine)):
        for name, value in part.items():
            if name in merged:
                assert torch.equal(merged[name], value), f"replicas of {name} differ"
            merged[name] = value
    return merged


def assembled_fp32(engine) -> dict[str, torch.Tensor]:
    """Full fp32 parameters put together from the fragments the PMA backend reports on every
    rank (all gathered; :func:`tests.support.fragments.assembled`)."""
    shards = engine.pma.backend.shards()
    return assembled(shards, {s.name: s.local for s in shards})


def moe_run(rank: int, world_size: int, pma: dict, steps: int = 4) -> dict:
    """A DeepSpeed MoE engine (expert parallel over 2 ranks) trained ``steps`` steps: every
    snapshot's fp32 masters under global names, and the merge (on rank 0; {} elsewhere)."""
    engine = make_moe_engine(world_size, ep_size=2, pma=pma)
    snapshots = []
    for step in range(steps):
        moe_step(engine, step, rank, world_size)
        snapshots.append(gathered_fp32(engine))
    with engine.pma.swapped():
        merged = gathered_fp32(engine)
    return {"snapshots": snapshots, "merged": merged} if rank == 0 else {}
