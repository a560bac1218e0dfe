"""torchtitan's components on CPU ranks (gloo): ``OptimizersContainer`` and ``CheckpointManager``
over a small FSDP2 model whose blocks look like torchtitan's MoE blocks to its load-balancing hook.

The trainer itself needs CUDA; these are the pieces it calls, in its order. References are
float64 merges of weights (and buffers) recorded after every ``optimizers.step()`` returns,
never the Merger's own output.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchtitan")

from pma_dist.integrations import torchtitan as titan  # noqa: E402
from pma_dist.testing import assert_bitwise_equal, assert_close_rel, run_ranks  # noqa: E402

pytestmark = pytest.mark.integration

VOCAB, DIM, EXPERTS, SEQ, BATCH = 29, 12, 5, 8, 8
"""The global batch: 8 sequences of 8 tokens, 64 tokens a step at any world size."""
STEPS, SAVE_AT = 8, 5
PMA = {"method": "wma", "window": 3, "interval_tokens": 128}
"""A snapshot every 2nd step when the 64 global tokens a step are counted."""


class Router(nn.Module):
    """What torchtitan's MoE hook reads: a coefficient, token counts, a bias it moves."""

    def __init__(self) -> None:
        super().__init__()
        self.load_balance_coeff = 0.05
        self.gate = nn.Parameter(torch.randn(EXPERTS, DIM) * 0.3)
        self.proj = nn.Linear(DIM, DIM)
        self.register_buffer("expert_bias_E", torch.zeros(EXPERTS))
        self.register_buffer("tokens_per_expert_E", torch.zeros(EXPERTS), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ self.gate.T
        choice = (scores + self.expert_bias_E).argmax(-1)
        with torch.no_grad():
            self.tokens_per_expert_E += torch.bincount(choice.flatten(), minlength=EXPERTS)
        weight = torch.sigmoid(scores.gather(-1, choice.unsqueeze(-1)))
        return x + self.proj(x) * weight


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe_enabled = True
        self.norm = nn.LayerNorm(DIM)
        self.moe = Router()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.norm(x))


class TinyMoE(nn.Module):
    """``layers`` is a ModuleDict of blocks, as ``register_moe_load_balancing_hook`` expects;
    ``late`` is moved by a step post-hook (a balancing rule applied after the step)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(2)})
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("late", torch.zeros(3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.layers.values():
            x = block(x)
        return self.head(x)


def _components(world_size: int, folder: Path, how: str = "states", exclude=()):
    """Model, optimizers, Merger and checkpointer, built in the trainer's order; the Merger
    in the checkpointer's ``states`` (``how="states"``), joined after (``"join"``, as for a
    built Trainer) or left out (``"none"``, a run without PMA)."""
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import (
        OptimizersContainer,
        default_adamw,
        register_moe_load_balancing_hook,
    )

    model, mesh = _shard(world_size)
    config = default_adamw(lr=1e-2)
    config.implementation = "for-loop"
    optimizers = OptimizersContainer(config, model_parts=[model])
    dims = SimpleNamespace(
        pp_enabled=False, ep_enabled=False, tp=1, get_optional_mesh=lambda name: mesh
    )

    def moe_then_late(optimizers, model_parts, parallel_dims) -> None:
        register_moe_load_balancing_hook(optimizers, model_parts, parallel_dims)

        def late(*_):
            model_parts[0].late.add_(torch.arange(1.0, 4.0))

        optimizers.register_step_post_hook(late)

    build = titan.post_optimizer_build_fn(PMA, inner=moe_then_late, tokens=lambda: SEQ * BATCH)
    build(optimizers, [model], dims)
    merger = titan.merger_of(optimizers)
    checkpoint = CheckpointManager.Config(
        enable=True,
        folder=str(folder),
        interval=SAVE_AT,
        keep_latest_k=0,
        exclude_from_loading=list(exclude),
    )
    checkpointer = CheckpointManager(
        checkpoint,
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=None,
        states=titan.checkpoint_states(merger) if how == "states" else {},
        sd_adapter=None,
    )
    if how == "join":
        assert titan.join(checkpointer, optimizers) is merger
    return model, optimizers, merger, checkpointer


def _shard(world_size: int):
    """The same initial model on every rank, FSDP2 per block and at the root; and its mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyMoE()
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh), mesh


def _train(model, optimizers, steps, rank: int, world_size: int, record=None) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        local = tokens.chunk(world_size)[rank]
        logits = model(local[:, :-1])
        F.cross_entropy(logits.reshape(-1, VOCAB), local[:, 1:].reshape(-1)).backward()
        optimizers.step()
        optimizers.zero_grad()
        if record is not None:
            record.append(_weights(model))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters and the averaged buffers, as the unwrapped model names them."""
    from pma_dist.backends import canonical_name
    from tests.support.models import full_state

    out = full_state(model)
    for name, b in model.named_buffers():
        if name.endswith(("expert_bias_E", "late")):
            out[canonical_name(name)] = b.detach().clone()
    return out


def _merged(model, merger) -> dict[str, torch.Tensor]:
    with merger.swapped():
        return _weights(model)


def _two_ranks(rank: int, world_size: int, root: str) -> dict:
    root = Path(root)
    model, optimizers, merger, checkpointer = _components(world_size, root / "ckpt")
    weights, out = [], {}
    for step in range(1, STEPS + 1):
        _train(model, optimizers, [step], rank, world_size, weights)
        checkpointer.save(curr_step=step)
        if step == SAVE_AT:
            out["at_save"] = {"merged": _merged(model, merger), "history": merger.history}
    out |= {"weights": weights, "merged": _merged(model, merger), "history": merger.history}
    out["live"] = _weights(model)

    model2, optimizers2, merger2, checkpointer2 = _components(world_size, root / "ckpt")
    out["loaded"] = checkpointer2.load()
    _train(model2, optimizers2, range(SAVE_AT + 1, STEPS + 1), rank, world_size)
    out["resumed"] = {"merged": _merged(model2, merger2), "live": _weights(model2)}

    hooks = len(optimizers._optimizer_step_post_hooks)
    out["detached"] = titan.detach(optimizers) is merger and titan.merger_of(optimizers) is None
    steps_seen = merger.schedule.steps_seen
    _train(model, optimizers, [STEPS + 1], rank, world_size)
    out["after_detach"] = (hooks, len(optimizers._optimizer_step_post_hooks), steps_seen)
    out["steps_after_detach"] = merger.schedule.steps_seen
    for manager in (checkpointer, checkpointer2):
        manager.close()
    return out if rank == 0 else {}


def _one_rank(rank: int, world_size: int, root: str) -> dict:
    """Resume the 2-rank run at 1 rank; then turn PMA on in a run checkpointed without it."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    root = Path(root)
    model, optimizers, merger, checkpointer = _components(world_size, root / "ckpt", "join")
    checkpointer.load(step=SAVE_AT)
    out = {"merged": _merged(model, merger), "history": merger.history}
    _train(model, optimizers, range(SAVE_AT + 1, STEPS + 1), rank, world_size)
    out["history_after"] = merger.history

    model, optimizers, _, plain = _components(world_size, root / "plain", "none")
    _train(model, optimizers, range(1, SAVE_AT + 1), rank, world_size)
    plain.save(curr_step=SAVE_AT)
    try:
        _components(world_size, root / "plain", "join")[3].load()
        out["without_pma"] = "loaded"
    except CheckpointException as err:
        out["without_pma"] = str(err)
    model, optimizers, merger, excluding = _components(world_size, root / "plain", "join", ["pma"])
    out["excluded"] = (excluding.load(), merger.schedule.steps_seen, merger.num_snapshots)
    _train(model, optimizers, [SAVE_AT + 1, SAVE_AT + 2], rank, world_size)
    out["fresh_history"] = merger.history
    for manager in (checkpointer, plain, excluding):
        manager.close()
    return out


def test_merge_checkpoint_reshard_hook_order_and_detach(tmp_path: Path) -> None:
    result = run_ranks(_two_ranks, 2, str(tmp_path), timeout=300)[0]
    weights = result["weights"]
    assert result["history"] == [(s, 64 * s) for s in (4, 6, 8)], "global tokens counted"
    expected = titan_reference(weights, [4, 6, 8])
    assert_close_rel(result["merged"], expected, 1e-6, "merge after OptimizersContainer.step()")
    for block in ("0", "1"):
        bias = weights[-1][f"layers.{block}.moe.expert_bias_E"]
        assert bias.abs().sum() > 0, "the MoE hook moved the expert bias"
    assert_close_rel(
        result["at_save"]["merged"], titan_reference(weights, [2, 4]), 1e-6, "merge at the save"
    )

    assert result["loaded"] is True
    assert_bitwise_equal(result["resumed"]["merged"], result["merged"], "merge resumed")
    assert_bitwise_equal(result["resumed"]["live"], result["live"], "weights resumed")

    assert result["detached"]
    before, after, steps_seen = result["after_detach"]
    assert after == before - 1, "the step post-hook removed"
    assert result["steps_after_detach"] == steps_seen, "a detached Merger is not stepped"

    single = run_ranks(_one_rank, 1, str(tmp_path), timeout=200)[0]
    assert_bitwise_equal(single["merged"], result["at_save"]["merged"], "resharded 2 -> 1 rank")
    assert single["history"] == result["at_save"]["history"]
    assert single["history_after"] == result["history"], "the schedule resumed at 1 rank"
    assert "pma" in single["without_pma"], single["without_pma"]
    assert single["excluded"] == (True, 0, 0), "PMA starts afresh on a checkpoint without it"
    assert single["fresh_history"] == [(2, 128)], "counted from the resumed step on"


def titan_reference(weights: list[dict], steps: list[int]) -> dict[str, torch.Tensor]:
    """The float64 WMA of the weights recorded after the given optimizer steps (1-based)."""
    from pma_dist.testing import window_reference

    return window_reference([weights[s - 1] for s in steps], PMA["window"], PMA["method"])


@pytest.mark.parametrize(
    "config, tokens, message",
    [
        ({"interval_tokens": 100}, None, "no global token count is given"),
        ({"interval_tokens": 100}, "64", "tokens='64': a count or a callable"),
    ],
)
def test_refused_before_torchtitan_builds(config, tokens, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        titan.post_optimizer_build_fn(config, tokens=tokens)


def test_pipeline_parts_refused() -> None:
    parts = [nn.Linear(2, 2), nn.Linear(2, 2)]
    optimizer = torch.optim.SGD([p for m in parts for p in m.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="pipeline parallelism"):
        titan.attach(optimizer, parts, {"window": 2, "interval_steps": 1})
    assert titan.merger_of(optimizer) is None


def test_disabled_runs_the_spec_hook_only() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    build = titan.post_optimizer_build_fn(
        {"enabled": False, "window": 2, "interval_steps": 1}, inner=lambda *a: calls.append(a)
    )
    build(optimizer, [model], None)
    assert calls == [(optimizer, [model], None)] and titan.merger_of(optimizer) is None
    assert titan.checkpoint_states(None) == {}, "a run without PMA checkpoints as before"
