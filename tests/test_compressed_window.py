"""The compressed window on plain tensors and a single-process Merger: every merge within one
rounding of each snapshot's own difference of the float64 merge (bounds from the codes'
definitions, pma_dist.testing), the chain through roll-over, late rejections, NaN/Inf and
rollbacks, the bytes it keeps, and the compiled passes against torch's bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

from pma_dist import Merger, PMAConfig, PMAConfigError, PMAStateError, SpikeGuard, SpikeGuardConfig
from pma_dist.core import CompressedWindow
from pma_dist.kernels import (
    BLOCK,
    _codes,
    _cpu,
    delta_segments,
    encode_delta,
    exps_shape,
    merge_deltas,
)
from pma_dist.testing import (
    assert_bitwise_equal,
    assert_close_rel,
    assert_compressed_merge,
    compressed_error_bounds,
    merge_reference,
    reference_weights,
)
from tests.support.models import batch, counting_batch, loss_of, make_model

SHAPES = [(40, 300), (257,), (3, 5, 130), (), (0, 4)]
BLOCKS = [BLOCK, 1, BLOCK, 1, BLOCK]
CODES = ["bf16", "fp8"]


def _trajectory(count: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Weights moved by Adam-like steps: about the same size everywhere, random sign."""
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(s, generator=g) * 0.02 for s in SHAPES]
    out = []
    for _ in range(count):
        theta = [
            t + 1e-4 * torch.randn(t.shape, generator=g).sign() * torch.rand(t.shape, generator=g)
            for t in theta
        ]
        out.append([t.clone() for t in theta])
    return out


def _state(code: str, window: int) -> CompressedWindow:
    return CompressedWindow([torch.zeros(s) for s in SHAPES], window, code=code, blocks=BLOCKS)


def _named(tensors) -> dict[str, torch.Tensor]:
    return {str(i): t for i, t in enumerate(tensors)}


def _merged(state: CompressedWindow, weights) -> dict[str, torch.Tensor]:
    out = [torch.full(s, float("nan")) for s in SHAPES]
    state.merge_into(out, weights)
    return _named(out)


@pytest.mark.parametrize("code", CODES)
def test_every_merge_is_within_one_rounding_of_each_snapshot(code: str) -> None:
    window, snapshots = 5, _trajectory(23)
    state = _state(code, window)
    for k, theta in enumerate(snapshots, 1):
        state.snapshot(theta, step=k)
        held = min(k, window)
        chain = [_named(s) for s in snapshots[:k]]
        for method in ("sma", "wma", "ema", "cosine"):
            w = reference_weights(method, held)
            assert_compressed_merge(
                _merged(state, w), chain, [0.0] * (k - held) + w, code, f"{method} at {k}"
            )
        if held >= 4:
            stride_weights = [0.0] * held
            stride_weights[-1], stride_weights[-3] = 0.5, 0.5
            assert_compressed_merge(
                _merged(state, stride_weights),
                chain,
                [0.0] * (k - held) + stride_weights,
                code,
                f"last=2 stride=2 at {k}",
            )
    for j in range(window):
        one_hot = [0.0] * window
        one_hot[j] = 1.0
        weights = [0.0] * (len(snapshots) - window) + one_hot
        chain = [_named(s) for s in snapshots]
        assert_compressed_merge(_merged(state, one_hot), chain, weights, code, f"snapshot {j}")


@pytest.mark.parametrize("code", CODES)
def test_the_error_does_not_grow_with_the_snapshots_taken(code: str) -> None:
    """Error feedback: after 20 or 60 snapshots a merge carries the same few roundings."""
    window, snapshots = 10, _trajectory(60, seed=3)
    state, exact = _state(code, window), []
    errors = {}
    for k, theta in enumerate(snapshots, 1):
        state.snapshot(theta)
        if k in (20, 60):
            merged = _merged(state, [1 / window] * window)
            truth = merge_reference([_named(s) for s in snapshots[k - window : k]], "sma")
            errors[k] = max(
                float((merged[n] - truth[n]).abs().max()) for n in truth if truth[n].numel()
            )
            exact.append(truth)
    assert errors[60] <= 2 * errors[20], errors


@pytest.mark.parametrize("code", CODES)
def test_the_bound_fails_a_merge_one_ulp_beyond_it_or_nan(code: str) -> None:
    snapshots = _trajectory(4, seed=5)
    state = _state(code, 4)
    for theta in snapshots:
        state.snapshot(theta)
    chain, weights = [_named(s) for s in snapshots], reference_weights("sma", 4)
    merged = _merged(state, weights)
    assert_compressed_merge(merged, chain, weights, code, "as merged")
    exact = sum(w * s["0"].double() for w, s in zip(weights, chain))
    bound = sum(abs(w) * b["0"] for w, b in zip(weights, compressed_error_bounds(chain, code)))
    off = dict(merged)
    off["0"] = off["0"].clone()
    off["0"].view(-1)[11] = float(exact.view(-1)[11] + 1.01 * bound.view(-1)[11] + 1e-7)
    with pytest.raises(AssertionError, match="element 11 is"):
        assert_compressed_merge(off, chain, weights, code, "off")
    off["0"].view(-1)[11] = float("nan")
    with pytest.raises(AssertionError, match="element 11 is"):
        assert_compressed_merge(off, chain, weights, code, "nan")


@pytest.mark.parametrize("code", CODES)
def test_a_rejected_snapshot_keeps_weight_zero_until_it_leaves(code: str) -> None:
    window, snapshots = 4, _trajectory(9, seed=1)
    state = _state(code, window)
    for k, theta in enumerate(snapshots[:6], 1):
        state.snapshot(theta, step=k)
    rejected = state.records[state.chain()[2]]
    assert state.reject(rejected.seq) == (rejected, None), "culprits come from the live weights"
    assert [r.step for r in state.merged_records()] == [3, 4, 6], "one valid snapshot fewer"
    chain = [_named(s) for s in snapshots[:6]]
    w = reference_weights("wma", 3)
    assert_compressed_merge(_merged(state, w), chain, [0, 0, w[0], w[1], 0, w[2]], code, "wma")
    for k, theta in enumerate(snapshots[6:], 7):
        state.snapshot(theta, step=k)
    assert [r.step for r in state.merged_records()] == [6, 7, 8, 9], "it left; full again"
    chain = [_named(s) for s in snapshots]
    assert_compressed_merge(_merged(state, [0.25] * 4), chain, [0] * 5 + [0.25] * 4, code, "sma")


@pytest.mark.parametrize("code", CODES)
def test_nonfinite_live_values_are_stored_as_no_change(code: str) -> None:
    window, snapshots = 3, _trajectory(6, seed=2)
    state = _state(code, window)
    flags = []
    effective = []
    for k, theta in enumerate(snapshots):
        theta = [t.clone() for t in theta]
        if k in (0, 3):
            for t, bad in zip(theta[:3], (float("nan"), float("inf"), -float("inf"))):
                t.view(-1)[5 * k + 1] = bad
        flags.append(float(state.snapshot(theta, check=True)))
        previous = effective[-1] if effective else [torch.zeros(s) for s in SHAPES]
        effective.append([torch.where(t.isfinite(), t, p) for t, p in zip(theta, previous)])
    assert flags == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    for name, plane in enumerate(state.slots + state.scales):
        assert all(bool(torch.isfinite(t.float()).all()) for t in plane), f"plane {name}"
    chain = [_named(s) for s in effective]
    assert_compressed_merge(
        _merged(state, [0.2, 0.3, 0.5]), chain, [0, 0, 0, 0.2, 0.3, 0.5], code, ""
    )


@pytest.mark.parametrize("code", CODES)
def test_dropping_the_newest_snapshots_rewinds_the_base(code: str) -> None:
    window, snapshots = 5, _trajectory(8, seed=4)
    state = _state(code, window)
    for k, theta in enumerate(snapshots[:6], 1):
        state.snapshot(theta, step=k)
    dropped = state.drop_since(5)
    assert [r.step for r in dropped] == [5, 6]
    assert [r.step for r in state.merged_records()] == [2, 3, 4]
    chain = [_named(s) for s in snapshots[:4]]
    assert_compressed_merge(
        _merged(state, [0.0, 0.0, 1.0]), chain, [0, 0, 0, 1.0], code, "newest kept"
    )
    replay = snapshots[:4] + snapshots[6:8]
    for k, theta in enumerate(snapshots[6:8], 7):
        state.snapshot(theta, step=k)
    chain = [_named(s) for s in replay]
    w = reference_weights("sma", 5)
    assert_compressed_merge(_merged(state, w), chain, [0] + w, code, "continued after a rollback")
    assert state.drop_since(0) and not state.merged_records()
    state.snapshot(snapshots[0], step=9)
    assert_bitwise_equal(_merged(state, [1.0]), _named(snapshots[0]), "a new chain starts exactly")
    state.snapshot(snapshots[1], step=3)
    before = _merged(state, [0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"drop_since\(5\): .* not the newest \(steps \[9, 3\]"):
        state.drop_since(5)
    assert_bitwise_equal(_merged(state, [0.5, 0.5]), before, "a refused drop changes nothing")


def test_an_fp8_save_encoded_again_keeps_its_planes_and_records() -> None:
    """Whether a rank's layout cuts a saved block is decided on that rank alone: encoded
    again, a wrapped chain keeps the planes and records it had, as a plane-by-plane load
    does, so every rank holds the same records (rank 0's header describes them all)."""
    from pma_dist.state._transcode import transcode

    snapshots = _trajectory(6, seed=8)
    saved = _state("fp8", 3)
    for k, theta in enumerate(snapshots, 1):
        saved.snapshot(theta, step=k)
    assert saved.chain() == [0, 2, 1], "the chain has wrapped"
    planes = dict(saved.stored())

    def dense(key: str, i: int) -> torch.Tensor:
        if not key.startswith("deltas."):
            return planes[key][i]
        k = int(key.split(".")[1])
        exps = planes[f"scales.{k}"][i]
        return _codes.decode("fp8", planes[key][i], exps, saved.segments[i])

    again = _state("fp8", 3)
    records = transcode(again, dense, "fp8", saved.records, "saved")
    assert records == saved.records
    again.restore(saved.count, records)
    for weights in ([0.2, 0.3, 0.5], [1.0, 0.0, 0.0]):
        assert_compressed_merge(
            _merged(again, weights),
            [_named(s) for s in snapshots],
            [0, 0, 0, *weights],
            "fp8",
            f"{weights}",
            roundings=2,
        )


def test_bytes_per_element_at_the_papers_window() -> None:
    like = [torch.zeros(1024, 4096), torch.zeros(4096, 1024), torch.zeros(4096), torch.zeros(2, 3)]
    numel = sum(t.numel() for t in like)
    for code, most in (("bf16", 22.5), ("fp8", 13.5)):
        blocks = [BLOCK, BLOCK, 1, BLOCK]
        state = CompressedWindow(like, 10, code=code, blocks=blocks)
        assert state.nbytes / numel <= most, (code, state.nbytes / numel)


def _passes(code, shape, runs, block, live_dtype, compiled: bool):
    _cpu.enabled = compiled
    try:
        g = torch.Generator().manual_seed(7)
        base = torch.randn(shape, generator=g) * 0.02
        change = torch.randn(shape, generator=g) * 1e-4 * torch.rand(shape, generator=g)
        live = (base + change).to(live_dtype)
        flat = live.view(-1)
        if flat.numel() > 600:
            flat[3], flat[7] = float("nan"), float("inf")
            flat[200:328] = base.view(-1)[200:328] + 1e3  # a block scaled beyond 448
            flat[400:528] = base.view(-1)[400:528].to(live_dtype)  # a block of zeros
            flat[530] = base.view(-1)[530] + 1e-30  # below e4m3's normal range
            base.view(-1)[600] = -1e36
            flat[600] = 3.3895e38  # a finite difference whose code decodes past float32
            base.view(-1)[740:1100] = 0
            tiny = torch.randn(flat[740:1100].shape, generator=g) * 1e-37
            flat[740:1100] = tiny.to(live_dtype)  # scales of 2^-127: P * 2^-127 is subnormal
        segs = delta_segments(shape, runs, block)
        delta = torch.zeros(shape, dtype=_codes.CODE_DTYPES[code])
        exps = torch.zeros(exps_shape(shape, runs, block), dtype=torch.uint8)
        exps = exps if code == "fp8" else None
        flag = encode_delta(code, base, live, delta, exps, segs)
        outs = [torch.zeros(shape), torch.zeros(shape, dtype=torch.bfloat16)]
        for out in outs:
            merge_deltas(code, out, base, 0.7, [(delta, exps, 0.3)], segs)
        return [flag, base, delta, *([exps] if exps is not None else []), *outs]
    finally:
        _cpu.enabled = True


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("live_dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_passes_equal_torch_bit_for_bit(code: str, live_dtype) -> None:
    if _cpu.built() is None:
        pytest.skip("no compiler here: the torch passes are the only ones")
    cases = [
        ((300, 257), None, BLOCK),
        ((1000,), None, 1),
        ((5000,), ((0, 1000), (1100, 3000)), BLOCK),
        ((), None, 1),
        ((3, 0), None, BLOCK),
        ((1, 600_000), None, BLOCK),
    ]
    for shape, runs, block in cases:
        compiled = _passes(code, shape, runs, block, live_dtype, True)
        reference = _passes(code, shape, runs, block, live_dtype, False)
        assert float(compiled[0]) == float(reference[0]) == (0.0 if math.prod(shape) > 600 else 1.0)
        assert all(bool(t.float().isfinite().all()) for t in compiled[1:]), "planes stay finite"
        if math.prod(shape) > 600:
            assert float(compiled[1].view(-1)[600]) == float(torch.tensor(-1e36)), (
                "an overflow is stored as no change"
            )
        for i, (a, b) in enumerate(zip(compiled[1:], reference[1:])):
            assert_bitwise_equal({"x": a}, {"x": b}, f"{code} {shape} output {i}")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"compression": "int4"}, "pma.compression = 'int4': must be one of none, bf16, fp8"),
        ({"compression": "bf16", "window": None}, "pma.compression = 'bf16': needs window mode"),
        ({"compression": "fp8", "dtype": "float64"}, "base snapshot in float32: set pma.dtype"),
    ],
)
def test_bad_compression_settings_name_the_key(settings, message) -> None:
    with pytest.raises(PMAConfigError, match=message.replace("(", r"\(")):
        PMAConfig(interval_steps=1, **settings)


@pytest.mark.parametrize("code", CODES)
def test_a_compressed_merger_swaps_applies_and_selects(code: str) -> None:
    torch.manual_seed(0)
    model = make_model(seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    merger = Merger(model, optimizer, PMAConfig(window=4, interval_steps=1, compression=code))
    chain = []
    for step in range(7):
        loss_of(model, batch(step, 0, 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
        merger.step()
        chain.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with merger.swapped("wma"):
        swapped = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert_bitwise_equal({n: p.detach() for n, p in model.named_parameters()}, live, "restored")
    assert_compressed_merge(
        swapped, chain, [0, 0, 0, *reference_weights("wma", 4)], code, "swapped wma"
    )
    result = merger.select(
        lambda: float(sum(p.detach().square().sum() for p in model.parameters()))
    )
    assert len(result.rows) > 3
    merger.apply("sma", last=2)
    applied = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert_compressed_merge(applied, chain, [0, 0, 0, 0, 0, 0.5, 0.5], code, "applied")
    assert merger.history == [(4, 0), (5, 0), (6, 0), (7, 0)]


def _trained(code: str, window: int = 4, steps: int = 7, seed: int = 1):
    model = make_model(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    merger = Merger(model, optimizer, PMAConfig(window=window, interval_steps=1, compression=code))
    chain = []
    for step in range(steps):
        loss_of(model, batch(step, 0, 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
        merger.step()
        chain.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return model, merger, chain


@pytest.mark.parametrize("saved", ["none", *CODES])
@pytest.mark.parametrize("ours", ["none", *CODES])
def test_per_rank_files_convert_between_kinds_once(tmp_path: Path, saved: str, ours: str, caplog):
    if saved == ours:
        pytest.skip("the same kind loads plane by plane (test_compressed_ranks)")
    _, merger, chain = _trained(saved)
    merger.save(tmp_path)
    index = json.loads((tmp_path / "pma_index.json").read_text())
    version = 2 if saved == "none" else 3
    assert index["version"] == index["header"]["meta"]["format"] == version, "the oldest it fits"
    fresh = Merger(
        make_model(seed=5), None, PMAConfig(window=4, interval_steps=1, compression=ours)
    )
    with caplog.at_level("WARNING", logger="pma_dist"):
        fresh.load(tmp_path)
    assert f"kept as {saved} taken into a window kept as {ours}" in caplog.text
    assert fresh.history == merger.history and fresh.num_snapshots == merger.num_snapshots
    weights = [0, 0, 0, *reference_weights("wma", 4)]
    merged = fresh.merged_shards("wma")
    if ours == "none" and saved != "none":
        exact = merger.merged_shards("wma")
        assert_close_rel(merged, exact, 1e-6, "the snapshots as the save held them")
    elif saved == "none":
        assert_compressed_merge(merged, chain, weights, ours, f"{saved} -> {ours}")
    else:
        coarser = "fp8" if "fp8" in (saved, ours) else "bf16"
        assert_compressed_merge(merged, chain, weights, coarser, f"{saved} -> {ours}", 2)


def test_a_dcp_checkpoint_loads_only_into_its_own_kind(tmp_path: Path) -> None:
    model, merger, _ = _trained("none")
    dcp.save({"pma": merger}, checkpoint_id=str(tmp_path), no_dist=True)
    other = Merger(model, None, PMAConfig(window=4, interval_steps=1, compression="fp8"))
    with pytest.raises(BaseException, match="Missing key in checkpoint state_dict: pma.base"):
        dcp.load({"pma": other}, checkpoint_id=str(tmp_path), no_dist=True)
    with pytest.raises(PMAStateError, match="pma.compression = 'none', this Merger keeps 'fp8'"):
        dcp.load(
            {"pma": other},
            checkpoint_id=str(tmp_path),
            planner=DefaultLoadPlanner(allow_partial_load=True),
            no_dist=True,
        )
    assert other.num_snapshots == 0, "nothing was loaded"


@pytest.mark.parametrize("code", CODES)
def test_a_corrupted_compressed_save_is_refused(tmp_path: Path, code: str) -> None:
    _, merger, _ = _trained(code)
    merger.save(tmp_path)
    (path,) = tmp_path.glob("pma_*_rank*.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = Merger(
        make_model(seed=5), None, PMAConfig(window=4, interval_steps=1, compression=code)
    )
    with pytest.raises(PMAStateError, match="checksum"):
        fresh.load(tmp_path)
    assert fresh.num_snapshots == 0


@pytest.mark.parametrize("code", CODES)
def test_spike_rollback_merges_the_healthy_snapshots(code: str) -> None:
    model = make_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    merger = Merger(model, optimizer, PMAConfig(window=5, interval_steps=2, compression=code))
    guard = SpikeGuard(merger, optimizer, SpikeGuardConfig(last_k=4))
    chain, steps = [], []
    for step in range(60):
        for group in optimizer.param_groups:
            group["lr"] = 0.3 if step in (50, 51) else 3e-3
        loss = loss_of(model, counting_batch(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if merger.step():
            chain.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
            steps.append(merger.schedule.steps_seen)
        if guard.observe(loss):
            recovered = {n: p.detach().clone() for n, p in model.named_parameters()}
            break
    (recovery,) = guard.recoveries
    used = recovery["snapshot_steps"]
    assert len(used) == 4 and max(used) <= 50
    weights = [0.25 if s in used else 0.0 for s in steps]
    assert_compressed_merge(recovered, chain, weights, code, "rolled back")
    assert merger.history[-1][0] == max(used), "the abandoned snapshots left the chain"


@pytest.mark.parametrize("code", CODES)
def test_exports_online_and_offline_agree_bit_for_bit(tmp_path: Path, code: str) -> None:
    from safetensors.torch import load_file

    from pma_dist.export import convert_to_hf
    from tests.support.hf_models import hf_train_step, make_hf_model

    model = make_hf_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    merger = Merger(model, optimizer, PMAConfig(window=4, interval_steps=1, compression=code))
    chain = []
    for step in range(6):
        hf_train_step(model, optimizer, step, 0, 1)
        merger.step()
        chain.append({n: p.detach().double().clone() for n, p in model.state_dict().items()})
    merger.export(tmp_path / "online", method="ema")
    merger.save(tmp_path / "files")
    state = {"model": model.state_dict(), "pma": merger}
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    online = load_file(tmp_path / "online" / "model.safetensors")
    for source in ("files", "ckpt"):
        convert_to_hf(
            tmp_path / source, tmp_path / f"from_{source}", config=model.config, method="ema"
        )
        offline = load_file(tmp_path / f"from_{source}" / "model.safetensors")
        assert_bitwise_equal(offline, online, f"offline from {source}")
    expected = {n: chain[0][n] for n in online}
    assert_compressed_merge(
        {n: online[n] for n in expected},
        [{n: s[n] for n in expected} for s in chain],
        [0, 0, *reference_weights("ema", 4)],
        code,
        "the export",
    )


@pytest.mark.parametrize("code", CODES)
def test_the_merge_monitor_ranks_and_exports_compressed_merges(tmp_path: Path, code: str):
    import json

    from safetensors.torch import load_file

    from pma_dist import MergeMonitor, MergeSpec

    torch.manual_seed(0)
    model = make_model(seed=0)
    merger = Merger(model, None, PMAConfig(window=4, interval_steps=1, compression=code))
    target = {n: p.detach().double() + 0.06 for n, p in model.named_parameters()}

    def distance(state) -> float:
        return float(sum(((state[n].double() - t) ** 2).sum() for n, t in target.items()))

    candidates = [MergeSpec("sma", 2), MergeSpec("wma", 4), MergeSpec("ema", 4)]
    options = {"every": 2, "candidates": candidates, "log_dir": str(tmp_path / "logs")}
    monitor = MergeMonitor(
        merger,
        lambda: distance({n: p.detach() for n, p in model.named_parameters()}),
        {**options, "best_dir": str(tmp_path / "best")},
    )
    g, chain = torch.Generator().manual_seed(1), []
    for _ in range(8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01 + 0.01)
        merger.step()
        chain.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        monitor.step()
    records = [json.loads(line) for line in monitor.log_path.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for record in records:
        k = record["step"]
        for row in record["merges"]:
            n = min(row["last"], k)
            weights = [0.0] * (k - n) + reference_weights(row["method"], n)
            expected = {name: sum(w * s[name] for w, s in zip(weights, chain)) for name in target}
            assert row["loss"] == pytest.approx(distance(expected), rel=1e-3), (k, row)
    best, k = monitor.best, monitor.best["step"]
    n = min(best["last"], k)
    weights = [0.0] * (k - n) + reference_weights(best["method"], n)
    exported = load_file(tmp_path / "best" / "model.safetensors")
    assert_compressed_merge(exported, chain[:k], weights, code, "the best merge, exported")
    monitor.close()
