"""Choosing the merge after the fact from one ring: decay-shaped weights (the window's updates
replayed under a learning-rate decay) and N and V picked with ``last``/``stride``, against
float64 computed from the recorded snapshots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pma_dist import Merger, PMAConfig, PMAConfigError
from pma_dist.testing import assert_close_rel
from tests.support.models import make_model

DECAYS = {
    "linear": lambda x: 1 - x,
    "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
    "minus_sqrt": lambda x: 1 - math.sqrt(x),
}
TOKENS = [100, 100, 250, 100, 100, 100]


def _run(window: int = 6):
    torch.manual_seed(0)
    model = make_model()
    merger = Merger(model, None, PMAConfig(window=window, interval_steps=1))
    snapshots = []
    for tokens in TOKENS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        assert merger.step(tokens=tokens)
        snapshots.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return model, merger, snapshots


@pytest.mark.parametrize("method", sorted(DECAYS))
def test_decay_shaped_merges_replay_the_updates(method: str) -> None:
    _, merger, snapshots = _run()
    f, n = DECAYS[method], len(snapshots)
    expected = {}
    for name in snapshots[0]:
        theta = snapshots[0][name].clone()
        for j in range(1, n):
            theta += f(j / n) * (snapshots[j][name] - snapshots[j - 1][name])
        expected[name] = theta
    merged = {k: v.double() for k, v in merger.merged_shards(method).items()}
    assert_close_rel(merged, expected, 1e-6, method)
    if method == "linear":
        assert_close_rel(merged, merger.merged_shards("sma"), 1e-6, "linear is SMA")


def test_last_and_stride_pick_n_and_v_from_one_ring(tmp_path: Path) -> None:
    model, merger, snapshots = _run()
    picked = [snapshots[1], snapshots[3], snapshots[5]]
    expected = {
        name: sum(w * s[name] for w, s in zip((1 / 6, 2 / 6, 3 / 6), picked))
        for name in snapshots[0]
    }
    merged = {k: v.double() for k, v in merger.merged_shards("wma", last=3, stride=2).items()}
    assert_close_rel(merged, expected, 1e-6, "wma, last=3, stride=2")
    assert merger.selection(last=3, stride=2) == [(2, 200), (4, 550), (6, 750)]
    assert merger.selection(stride=5) == [(1, 100), (6, 750)], "as many as fit"
    with pytest.raises(ValueError, match=r"at stride 2 the newest 3 fit"):
        merger.merged_shards(last=4, stride=2)
    with pytest.raises(ValueError, match="stride=0"):
        merger.merged_shards(stride=0)
    merger.export(tmp_path / "hf", method="cosine", last=3, stride=2)
    manifest = json.loads((tmp_path / "hf" / "pma_manifest.json").read_text())
    pma = manifest["pma"]
    assert pma["method"] == "cosine" and pma["history"] == [[2, 200], [4, 550], [6, 750]]
    assert pma["spacing_tokens"] == [350, 200], "the recorded spacing, not stride x interval"


def test_decay_shapes_need_the_window() -> None:
    with pytest.raises(PMAConfigError, match=r"pma.method = 'cosine': decay-shaped merges need"):
        PMAConfig(method="cosine", window=None)
    running = Merger(make_model(), None, PMAConfig(window=None, interval_steps=1))
    running.snapshot()
    with pytest.raises(ValueError, match="need window mode"):
        running.merged_shards(stride=2)
