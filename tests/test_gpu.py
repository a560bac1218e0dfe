"""The accelerator path: slots offloaded to pinned host memory and filled on a side stream."""

from __future__ import annotations

import pytest
import torch

from pma_dist import Merger, PMAConfig
from pma_dist.kernels import STAGING_NUMEL
from pma_dist.testing import (
    assert_bitwise_equal,
    assert_close_rel,
    merge_reference,
    window_reference,
)
from tests.support.models import full_state, make_model
from tests.support.probes import no_host_sync

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


def test_optimizer_step_waits_for_the_side_stream_copy() -> None:
    """A snapshot copy held back on its stream must still read the pre-step weights."""
    device = torch.device("cuda")
    model = make_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    merger = Merger(model, optimizer, PMAConfig(window=2, interval_steps=1, offload="cpu"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {k: v.clone() for k, v in full_state(model).items()}
    (side_copy,) = merger._state._side_copies.values()
    side = side_copy._stream
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)
    assert merger.snapshot()
    optimizer.step()
    merger._state.wait_host()
    slot = dict(zip(merger.names, merger._state.slots[0]))
    assert slot.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(slot[name], tensor.cpu()), name


def test_fp16_weights_with_large_sums_are_finite() -> None:
    """The finite check sums in fp32: an fp16 L1 norm above 65504 is not a non-finite weight."""
    model = make_model(dtype=torch.float16).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(100.0)
    merger = Merger(model, None, PMAConfig(window=2, interval_steps=1, on_nonfinite="raise"))
    assert merger.snapshot() and merger.num_snapshots == 1


def _fsdp2_offloaded_checkpoint(rank: int, world_size: int, directory: str) -> None:
    import torch.distributed.checkpoint as dcp

    from tests.support.models import shard_fsdp2

    model = shard_fsdp2(make_model().cuda(), world_size, device_type="cuda")
    merger = Merger(model, None, PMAConfig(window=2, interval_steps=1, offload="cpu"))
    assert merger.snapshot()
    allocated = torch.cuda.memory_allocated()
    state = merger.state_dict()
    locals_ = [v.to_local() for slot in state["slots"].values() for v in slot.values()]
    assert all(t.device.type == "cpu" for t in locals_)
    assert torch.cuda.memory_allocated() == allocated
    saved = [[t.clone() for t in slot] for slot in merger._state.slots]
    dcp.save({"pma": merger}, checkpoint_id=directory)
    for slot in merger._state.slots:
        for t in slot:
            t.zero_()
    dcp.load({"pma": merger}, checkpoint_id=directory)
    for got, want in zip(merger._state.slots, saved):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_fsdp2_offloaded_state_is_checkpointed_from_host_memory(tmp_path) -> None:
    """DCP saves and loads host slots of a CUDA-mesh FSDP2 model without copying them to GPU."""
    from pma_dist.testing import run_ranks

    run_ranks(_fsdp2_offloaded_checkpoint, 1, str(tmp_path / "ckpt"), backend="cpu:gloo,cuda:nccl")


def test_bf16_weights_reach_fp32_host_slots_exactly() -> None:
    """bf16 -> fp32 is exact; the converting copy runs in chunks (crossing a chunk boundary)."""
    model = make_model(dtype=torch.bfloat16).cuda()
    model.big = torch.nn.Parameter(torch.randn(STAGING_NUMEL + 5, device="cuda").bfloat16())
    merger = Merger(model, None, PMAConfig(window=2, interval_steps=1, offload="cpu"))
    assert merger.snapshot()
    merger._state.wait_host()
    params = dict(model.named_parameters())
    for name, slot in zip(merger.names, merger._state.slots[0]):
        assert slot.dtype == torch.float32
        assert torch.equal(slot, params[name].detach().float().cpu()), name


def test_device_slots_are_copied_and_checked_by_the_triton_kernel(monkeypatch) -> None:
    """Window snapshots into GPU slots: tensors of MIN_NUMEL and more go through the fused
    copy-and-sum kernel (the small ones through foreach batches), the slots hold the live
    weights bitwise, and a NaN in a large tensor is left out of the window at agreement."""
    from pma_dist.kernels import _triton as triton_kernels

    launched = []
    copy_sum = triton_kernels.copy_sum

    def counting(dst, src):
        total = copy_sum(dst, src)
        launched.append((len(dst), total is not None))
        return total

    monkeypatch.setattr(triton_kernels, "copy_sum", counting)
    model = make_model().cuda()
    model.big = torch.nn.Parameter(torch.randn(triton_kernels.MIN_NUMEL * 3 + 7, device="cuda"))
    merger = Merger(model, None, PMAConfig(window=3, interval_steps=1))
    with no_host_sync():
        assert merger.snapshot()
    assert launched == [(1, True)], launched
    params = dict(model.named_parameters())
    for name, slot in zip(merger.names, merger._state.slots[0]):
        assert torch.equal(slot, params[name].detach()), name
    with torch.no_grad():
        model.big[-1] = float("nan")
    with no_host_sync():
        merger.snapshot()
    merger.agree()
    assert merger.num_snapshots == 1 and merger.num_skipped == 1


@pytest.mark.parametrize("method", ["sma", "ema"])
def test_running_snapshots_on_the_device_fold_without_a_host_sync(method: str) -> None:
    """Running snapshots into device slots: no host sync (the verdict guards the lerp on the
    device), a NaN snapshot folds nothing in, and the slot equals the float64 running average
    of the accepted snapshots once the host learns the verdicts."""
    from tests.support.probes import counted_calls

    model = make_model().cuda()
    merger = Merger(model, None, PMAConfig(method=method, window=None, interval_steps=1))
    reference = None
    accepted = 0
    with counted_calls() as calls:
        for step in range(5):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * (step + 1))
                if step == 2:
                    next(model.parameters()).view(-1)[0] = float("nan")
            with no_host_sync():
                merger.snapshot()
            if step != 2:
                accepted += 1
                alpha = merger.config.ema_alpha
                weight = 1 / accepted if method == "sma" else (alpha if accepted > 1 else 1.0)
                live = {k: v.double() for k, v in full_state(model).items()}
                reference = (
                    live
                    if reference is None
                    else {k: reference[k] + weight * (live[k] - reference[k]) for k in live}
                )
            else:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = 0.0
    assert dict(calls) == {}, dict(calls)
    merger.agree()
    assert (merger.num_snapshots, merger.num_skipped) == (4, 1)
    assert_close_rel(merger.merged_shards(), reference, 1e-6, f"running {method}")


@pytest.mark.parametrize("code", ["bf16", "fp8"])
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_compressed_windows_on_the_device_encode_as_the_cpu_kernel_does(
    code: str, offload: str
) -> None:
    """A compressed window of device tensors, in device memory (Triton kernels: no host sync in
    a snapshot) or in host memory (encoded on the host from the staged copy: no device memory
    beyond training's). Its merges lie within the codes' bound of the float64 merge and equal
    the CPU kernel's bit for bit, and its planes hold the bits the CPU kernel writes."""
    from pma_dist.core import CompressedWindow
    from pma_dist.testing import assert_compressed_merge, reference_weights

    model = make_model().cuda()
    model.big = torch.nn.Parameter(torch.randn(64, 4096 + 3, device="cuda") * 0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step() -> None:
        tokens = torch.randint(0, 37, (8, 13), device="cuda")
        loss = torch.nn.functional.cross_entropy(
            model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
        )
        (loss + model.big.square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()
    torch.cuda.synchronize()
    training_bytes = torch.cuda.memory_allocated()
    config = PMAConfig(window=4, interval_steps=1, compression=code, offload=offload)
    merger = Merger(model, optimizer, config)
    chain, live = [], []
    for _ in range(6):
        train_step()
        live.append([p.detach().cpu().clone() for p in model.parameters()])
        if offload == "none":
            with no_host_sync():
                merger.snapshot()
        else:
            merger.snapshot()
        merger.agree()
        chain.append({k: v.double().cpu() for k, v in full_state(model).items()})
    torch.cuda.synchronize()
    if offload == "cpu":
        extra = torch.cuda.memory_allocated() - training_bytes
        assert extra <= 1 << 16, f"the offloaded window holds {extra} bytes of device memory"
    merged = {k: v.cpu() for k, v in merger.merged_shards("wma").items()}
    weights = [0, 0, *reference_weights("wma", 4)]
    assert_compressed_merge(merged, chain, weights, code, f"device, offload {offload}")
    state = merger._state
    host = CompressedWindow([t.cpu() for t in state.slots[0]], 4, code=code, blocks=state.blocks)
    for snapshot in live:
        host.snapshot(snapshot)
    for (key, device_plane), (_, host_plane) in zip(state.stored(), host.stored()):
        for d, h in zip(device_plane, host_plane):
            assert torch.equal(
                d.cpu().reshape(-1).view(torch.uint8), h.reshape(-1).view(torch.uint8)
            ), key
    out = [torch.full(t.shape, float("nan")) for t in live[0]]
    host.merge_into(out, reference_weights("wma", 4))
    for name, expected in zip(merger.names, out):
        assert torch.equal(merged[name].view(torch.int32), expected.view(torch.int32)), name
