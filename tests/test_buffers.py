"""The merged model is the average of the checkpoints, buffers included: a DeepSeek-V3-style
MoE whose expert-bias buffer (auxiliary-loss-free balancing) the training loop moves, under
FSDP2 at 2 ranks, against a float64 reference of parameters and buffers."""

from __future__ import annotations

from pathlib import Path

import torch

from pma_dist import Merger, PMAConfig, PMAStateError
from pma_dist.testing import assert_bitwise_equal, assert_close_rel, run_ranks, window_reference
from tests.support.hf_models import hf_train_step, make_hf_model, shard_hf_fsdp2
from tests.support.models import full_state

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


def _balance(model, step: int, rank: int) -> None:
    """What a balancing rule does after a step: nudge each expert's bias by its load error
    (here a deterministic stand-in, the same on every rank as a real rule's all-reduced loads)."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.add_(torch.tensor([1.0, -2.0, 0.5, 0.25]) * 1e-2 * (step + 1) ** 0.5)


def _state(model) -> dict[str, torch.Tensor]:
    out = full_state(model)
    out[BIAS] = model.get_buffer(BIAS).detach().clone()
    return out


def _worker(rank: int, world_size: int, root: str) -> dict:
    model = shard_hf_fsdp2(make_hf_model("deepseek_v3", seed=0), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    merger = Merger(model, optimizer, PMAConfig(method="wma", window=3, interval_steps=1))
    live_only = Merger(
        model, optimizer, PMAConfig(window=3, interval_steps=1, average_buffers=False)
    )
    snapshots = []
    for step in range(5):
        hf_train_step(model, optimizer, step, rank, world_size)
        _balance(model, step, rank)
        merger.step()
        live_only.step()
        snapshots.append(_state(model))
    live = _state(model)
    with merger.swapped():
        merged = _state(model)
    with live_only.swapped():
        merged_live_buffers = _state(model)
    restored = _state(model)
    merger.export(Path(root) / "hf")
    merger.check_replicas()
    if rank == 1:
        with torch.no_grad():
            merger._state.slots[0][merger.names.index(BIAS)][0] += 1.0
    try:
        merger.check_replicas()
        diverged = "not detected"
    except PMAStateError as err:
        diverged = str(err)
    return {
        "buffer_names": merger.buffer_names,
        "snapshots": snapshots,
        "merged": merged,
        "live": live,
        "restored": restored,
        "merged_live_buffers": merged_live_buffers,
        "diverged": diverged,
    }


def test_expert_bias_buffer_is_averaged_with_the_parameters(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    r0, r1 = run_ranks(_worker, 2, str(tmp_path))
    assert r0["buffer_names"] == [BIAS], "persistent floating buffers only (not rotary tables)"
    expected = window_reference(r0["snapshots"], 3, "wma")
    assert_close_rel(r0["merged"], expected, 1e-6, "parameters and expert bias")
    assert not torch.equal(r0["merged"][BIAS], r0["live"][BIAS]), "the bias really moved"
    assert_bitwise_equal(r1["merged"], r0["merged"], "every rank holds the same merged buffer")
    assert_bitwise_equal(r0["restored"], r0["live"], "swap restores the live buffer")
    assert_bitwise_equal(
        {BIAS: r0["merged_live_buffers"][BIAS]}, {BIAS: r0["live"][BIAS]}, "average_buffers=False"
    )
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert_bitwise_equal({BIAS: exported[BIAS]}, {BIAS: r0["merged"][BIAS]}, "exported bias")
    for r in (r0, r1):
        assert "replicas differ: ranks 0 and 1" in r["diverged"], r["diverged"]
