"""Accelerate: the DeepSpeed plugin carries the "pma" section (2 CPU ranks), attaching to an
FSDP run whose parameters were silently left unsharded is refused, and a Merger built on a
prepared optimizer hooks the torch optimizer inside it."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from pma_dist.testing import (  # noqa: E402
    assert_close_rel,
    run_ranks,  # noqa: E402
    window_reference,
)
from tests.support.deepspeed_runs import ds_config, full_fp32  # noqa: E402
from tests.support.models import batch, loss_of, make_model  # noqa: E402


def _train(accelerator, model, optimizer, rank: int, world_size: int, after_step) -> list:
    """Three steps; what ``after_step()`` returns after each."""
    out = []
    for step in range(3):
        accelerator.backward(loss_of(model, batch(step, rank, world_size)))
        optimizer.step()
        optimizer.zero_grad()
        out.append(after_step())
    return out


def _deepspeed_plugin_worker(rank: int, world_size: int) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from pma_dist.accelerate import attach, detach

    config = ds_config(2, world_size, {"method": "sma", "window": 2, "interval_steps": 1})
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    model = make_model(seed=0)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=2e-2))
    merger = attach(accelerator, model, optimizer)
    snapshots = _train(accelerator, model, optimizer, rank, world_size, lambda: full_fp32(model))
    with merger.swapped():
        merged = full_fp32(model)
    out = {"count": merger.num_snapshots, "snapshots": snapshots, "merged": merged}
    out["same_object"] = model.pma is merger
    detach(accelerator, model)
    _train(accelerator, model, optimizer, rank, world_size, lambda: None)
    out["after_detach"] = (merger.num_snapshots, sorted(set(vars(model)) & {"pma", "step"}))
    return out


def test_deepspeed_plugin_pma_section() -> None:
    result = run_ranks(_deepspeed_plugin_worker, 2)[0]
    assert result["same_object"] and result["count"] == 3
    assert result["after_detach"] == (3, []), "detached: no more snapshots, engine restored"
    assert_close_rel(
        result["merged"], window_reference(result["snapshots"], 2, "sma"), 1e-6, "accelerate"
    )


def _fsdp_fallback_worker(rank: int, world_size: int) -> str:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    from pma_dist.accelerate import attach

    accelerator = Accelerator(
        fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    model = make_model()
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    try:
        attach(accelerator, model, optimizer, {"interval_steps": 1})
    except RuntimeError as err:
        return str(err)
    return "attached"


def test_fsdp_requested_but_unsharded_is_refused() -> None:
    for message in run_ranks(_fsdp_fallback_worker, 2):
        assert "FSDP was requested but the prepared model's parameters are not sharded" in message


def _prepared_optimizer_worker(rank: int, world_size: int) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from pma_dist import Merger, PMAConfig
    from tests.support.models import full_state

    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    model = make_model(seed=0)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=2e-2))
    config = PMAConfig(method="sma", window=2, interval_steps=1, offload="cpu")
    merger = Merger(model, optimizer, config)
    snapshots = _train(
        accelerator, model, optimizer, rank, world_size, lambda: merger.step() and full_state(model)
    )
    with merger.swapped():
        merged = full_state(model)
    return {"hooked": merger._step_hooked, "snapshots": snapshots, "merged": merged}


def test_an_accelerate_prepared_optimizer_takes_the_step_hook_inside() -> None:
    """AcceleratedOptimizer is a torch Optimizer that skips its base __init__: the step pre-hook
    (needed with offload) goes on the torch optimizer it wraps."""
    (result,) = run_ranks(_prepared_optimizer_worker, 1)
    assert result["hooked"]
    expected = window_reference(result["snapshots"], 2, "sma")
    assert_close_rel(result["merged"], expected, 1e-6, "merge through a prepared optimizer")
