"""The accelerator path: slots offloaded to pinned host memory and filled on a side stream."""

from __future__ import annotations

import pytest
import torch

from pma_dist import Merger, PMAConfig
from pma_dist.offload import STAGING_NUMEL
from tests.support.models import full_state, make_model
from tests.support.reference import (
    assert_bitwise_equal,
    assert_close_rel,
    merge_reference,
    window_reference,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("window", [3, None])
def test_offloaded_slots_match_reference(window: int | None) -> None:
    device = torch.device("cuda")
    model = make_model().to(device)
    model.big = torch.nn.Parameter(torch.randn(STAGING_NUMEL + 5, device=device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    merger = Merger(
        model, optimizer, PMAConfig(method="wma", window=window, interval_steps=1, offload="cpu")
    )
    assert merger._state.slots[0][0].device.type == "cpu" and merger._state.slots[0][0].is_pinned()
    snapshots = []
    for _ in range(7):
        tokens = torch.randint(0, 37, (8, 13), device=device)
        loss = torch.nn.functional.cross_entropy(
            model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
        )
        (loss + model.big.square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert merger.step()
        snapshots.append({k: v.cpu() for k, v in full_state(model).items()})
    before = {k: v.cpu() for k, v in full_state(model).items()}
    with merger.swapped():
        merged = {k: v.cpu() for k, v in full_state(model).items()}
    assert_bitwise_equal({k: v.cpu() for k, v in full_state(model).items()}, before, "restore")
    expected = (
        window_reference(snapshots, window, "wma") if window else merge_reference(snapshots, "wma")
    )
    assert_close_rel(merged, expected, 1e-6, "offloaded merge")
