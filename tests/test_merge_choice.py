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


def _reference_weights(method: str, k: int, alpha: float = 0.2) -> list[float]:
    if method == "sma":
        return [1 / k] * k
    if method == "wma":
        return [i / (k * (k + 1) / 2) for i in range(1, k + 1)]
    if method == "ema":
        return [(1 - alpha) ** (k - 1)] + [alpha * (1 - alpha) ** (k - i) for i in range(2, k + 1)]
    f = DECAYS[method]
    return [f((i - 1) / k) - f(i / k) for i in range(1, k + 1)]


def test_select_ranks_candidates_on_held_out_loss() -> None:
    from pma_dist import MergeSpec

    model, merger, snapshots = _run()
    target = {n: sum(s[n] for s in snapshots[2:]) / 4 for n in snapshots[0]}

    def distance(state) -> float:
        return float(sum(((state[n].double() - target[n]) ** 2).sum() for n in target))

    def evaluate() -> float:
        return distance({n: p.detach() for n, p in model.named_parameters()})

    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = merger.select(evaluate)
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters()), "restored"
    assert result.best == MergeSpec("sma", 4, 1), result.table()
    assert abs(result.baseline - distance(snapshots[-1])) < 1e-4
    for candidate, loss in result.rows:
        k, s = candidate.last, candidate.stride
        chosen = [snapshots[len(snapshots) - 1 - (k - 1 - i) * s] for i in range(k)]
        weights = _reference_weights(candidate.method, k)
        merged = {n: sum(w * c[n] for w, c in zip(weights, chosen)) for n in target}
        assert abs(loss - distance(merged)) < 1e-4, (str(candidate), loss, distance(merged))
    assert [c.last for c, _ in result.rows].count(1) == 1, "N = 1 is the same for every method"
    assert all(a[1] <= b[1] for a, b in zip(result.rows, result.rows[1:])), "best first"
    given = [MergeSpec("wma", 3, 2), MergeSpec("sma", 4)]
    chosen = merger.select(evaluate, given, apply_best=True)
    assert {c for c, _ in chosen.rows} == set(given), "the candidates as given"
    best = merger.merged_shards("sma", last=4)
    assert all(torch.equal(p.detach(), best[n]) for n, p in model.named_parameters()), "applied"


def _select_worker(rank: int, world_size: int) -> dict:
    from tests.support.models import shard_fsdp2

    model = shard_fsdp2(make_model(), world_size)
    merger = Merger(model, None, PMAConfig(window=4, interval_steps=1))
    for _ in range(4):
        merger.snapshot()
    result = merger.select(lambda: torch.tensor(float(rank)))
    return {"baseline": result.baseline, "losses": [loss for _, loss in result.rows]}


def test_select_averages_the_loss_over_ranks() -> None:
    from pma_dist.testing import run_ranks

    for r in run_ranks(_select_worker, 2):
        assert r["baseline"] == 0.5 and set(r["losses"]) == {0.5}, r


def test_config_last_and_stride_choose_the_default_merge() -> None:
    torch.manual_seed(0)
    model = make_model()
    config = PMAConfig.from_deepspeed(
        {"pma": {"method": "minus_sqrt", "window": 6, "interval_steps": 1, "last": 2, "stride": 3}}
    )
    merger = Merger(model, None, config)
    snapshots = []
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        merger.step(tokens=100)
        snapshots.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    c = 1 - math.sqrt(0.5)
    expected = {n: (1 - c) * snapshots[2][n] + c * snapshots[5][n] for n in snapshots[0]}
    merged = {k: v.double() for k, v in merger.merged_shards().items()}
    assert_close_rel(merged, expected, 1e-6, "the config's default merge")
    assert merger.selection() == [(3, 300), (6, 600)]
    everything = merger.merged_shards("sma", weights=None, last=6)
    assert_close_rel(
        {k: v.double() for k, v in everything.items()},
        {n: sum(s[n] for s in snapshots) / 6 for n in snapshots[0]},
        1e-6,
        "an explicit last overrides the config's",
    )
    from pma_dist import MergeSpec

    wma = {n: (snapshots[2][n] + 2 * snapshots[5][n]) / 3 for n in snapshots[0]}
    as_spec = {k: v.double() for k, v in merger.merged_shards(MergeSpec("wma")).items()}
    assert_close_rel(as_spec, wma, 1e-6, "a MergeSpec takes the config's N and V")
    assert merger.selection(spec=MergeSpec(weights=[0, 1, 0, 0, 0, 1])) == [(2, 200), (6, 600)]
    with pytest.raises(ValueError, match="pass a MergeSpec"):
        merger.merged_shards(MergeSpec("wma"), last=2)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"window": 4, "last": 3, "stride": 2}, "pma.last = 3: at stride 2 spans 5 snapshots"),
        ({"window": None, "last": 2}, "pma.last = 2: needs window mode"),
        ({"window": 4, "stride": 0}, "pma.stride = 0: must be an integer >= 1"),
        ({"window": 4, "last": 0}, "pma.last = 0: must be an integer >= 1"),
    ],
)
def test_config_default_merge_errors_name_the_key(settings: dict, message: str) -> None:
    with pytest.raises(PMAConfigError, match=message):
        PMAConfig(interval_steps=1, **settings)
