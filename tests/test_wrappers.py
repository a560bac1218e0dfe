"""Names survive wrappers: activation checkpointing (the way FSDP2 users apply it),
``torch.compile`` and DDP leave the averaged tensors under transformers' own names, so state
resumes across wrappers and an offline export of a wrapped run equals the online one; a
channels_last model (weights whose strides are not row-major) merges as a contiguous one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pma_dist import Merger, PMAConfig
from pma_dist.backends import canonical_name
from pma_dist.testing import (
    assert_bitwise_equal,
    assert_close_rel,
    assert_compressed_merge,
    merge_reference,
    reference_weights,
    run_ranks,
)
from tests.support.cli import run_cli
from tests.support.hf_models import hf_train_step, make_hf_model, shard_hf_fsdp2
from tests.support.models import full_state

CONFIG = PMAConfig(method="wma", window=3, interval_steps=1)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("module.layers.0.weight", "layers.0.weight"),
        ("_orig_mod.module.layers.0.weight", "layers.0.weight"),
        ("layers.0._checkpoint_wrapped_module.mlp.w", "layers.0.mlp.w"),
        ("_orig_mod.layers.0._orig_mod._checkpoint_wrapped_module.w", "layers.0.w"),
        ("_fsdp_wrapped_module.layers.0._fsdp_wrapped_module.w", "layers.0.w"),
        ("encoder.conv_module.weight", "encoder.conv_module.weight"),
        ("encoder.module.weight", "encoder.module.weight"),
        ("module_list.0.weight", "module_list.0.weight"),
        ("weight", "weight"),
    ],
)
def test_canonical_names_drop_whole_wrapper_components(name: str, expected: str) -> None:
    assert canonical_name(name) == expected


def _model(checkpointing: bool, world_size: int):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = make_hf_model("llama", seed=0)
    if checkpointing:
        model.config.use_cache = False  # a recomputed forward must not grow a KV cache
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    return shard_hf_fsdp2(model, world_size)


def _merges(model, merger: Merger) -> dict[str, torch.Tensor]:
    out = {}
    for method in ("sma", "wma", "ema"):
        with merger.swapped(method):
            out.update({f"{method}.{k}": v for k, v in full_state(model).items()})
    return out


def _worker(rank: int, world_size: int, root: str, checkpointing: bool, save: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    hf_names = [n for n, _ in make_hf_model("llama").named_parameters()]
    model = _model(checkpointing, world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    merger = Merger(model, optimizer, CONFIG)
    wrapped = any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    out = {"names_ok": merger.names == hf_names, "wrapped": wrapped}
    checkpoint = str(Path(root) / "ckpt")
    if save:
        for step in range(4):
            hf_train_step(model, optimizer, step, rank, world_size)
            merger.step()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, "pma": merger}, checkpoint_id=checkpoint)
        merger.export(Path(root) / "online")
        out["merges"] = _merges(model, merger)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "pma": merger}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        out["merges"] = _merges(model, merger)
        plain = make_hf_model("llama")
        compiled = torch.compile(plain, backend="eager")
        over_ddp = torch.compile(DDP(make_hf_model("llama")), backend="eager")
        out["compiled_names_ok"] = [
            Merger(m, None, CONFIG).names == hf_names for m in (compiled, over_ddp)
        ]
    return out if rank == 0 else {}


def test_activation_checkpointing_and_compile_keep_names_and_resume(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    saved = run_ranks(_worker, 2, str(tmp_path), True, True)[0]
    assert saved["wrapped"], "the layers really run under checkpoint_wrapper"
    assert saved["names_ok"], "names are transformers' names under activation checkpointing"
    loaded = run_ranks(_worker, 2, str(tmp_path), False, False)[0]
    assert not loaded["wrapped"] and loaded["names_ok"]
    assert loaded["compiled_names_ok"] == [True, True], "compile, and compile over DDP"
    assert_bitwise_equal(loaded["merges"], saved["merges"], "DCP resume, checkpointing on -> off")

    done = run_cli(
        "export",
        str(tmp_path / "ckpt"),
        str(tmp_path / "offline"),
        "--config",
        str(tmp_path / "online"),
    )
    assert done.returncode == 0, done.stderr
    online = load_file(tmp_path / "online" / "model.safetensors")
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    assert_bitwise_equal(offline, online, "offline export of a checkpointed run")


@pytest.mark.parametrize(
    "compression, method, offload",
    [
        ("none", "wma", "none"),
        ("none", "ema", "cpu"),
        ("bf16", "sma", "none"),
        ("fp8", "wma", "cpu"),
    ],
)
def test_a_channels_last_model_merges_like_a_contiguous_one(
    compression: str, method: str, offload: str
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    window = None if method == "ema" else 3
    config = PMAConfig(
        method=method,
        window=window,
        interval_steps=1,
        offload=offload,
        compression=compression,
    )
    merger = Merger(model, None, config)
    snapshots = []
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
        merger.step()
    merged = merger.merged_shards()
    if compression == "none":
        expected = merge_reference(snapshots if window is None else snapshots[-3:], method)
        assert_close_rel(merged, expected, tol=1e-6, what=method)
    else:
        weights = [0.0, 0.0, *reference_weights(method, 3)]
        assert_compressed_merge(merged, snapshots, weights, compression, compression)
    live = {k: v.detach().clone() for k, v in model.named_parameters()}
    with merger.swapped():
        swapped = {k: v.detach().clone() for k, v in model.named_parameters()}
        assert not model[0].weight.is_contiguous(), "the swap keeps the weights' strides"
    assert_bitwise_equal(swapped, merged, "swapped in")
    assert_bitwise_equal({k: v.detach() for k, v in model.named_parameters()}, live, "restored")
