"""Merged-model exports under FSDP2 at 1, 2 and 4 ranks: HF safetensors and DCP, dense and MoE.

The proof is end to end: the export loads with ``AutoModelForCausalLM.from_pretrained`` with no
missing or unexpected keys, its weights are the merged ones, and its logits equal those of the
live model inside ``merger.swapped()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from pma_dist import Merger, PMAConfig
from pma_dist.export import verify_export
from pma_dist.testing import assert_bitwise_equal, assert_close_rel, run_ranks
from tests.support.cli import run_cli
from tests.support.hf_models import hf_batch, hf_train_step, make_hf_model, shard_hf_fsdp2
from tests.support.models import full_state
from tests.support.probes import counted_calls


def _export_worker(rank: int, world_size: int, root: str, kind: str, replicas: int) -> dict:
    if replicas == 1:
        model = shard_hf_fsdp2(make_hf_model(kind, seed=0), world_size)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        from pma_dist.tools import fully_shard_blocks

        model = make_hf_model(kind, seed=0)
        shape, names = (replicas, world_size // replicas), ("replicate", "shard")
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        fully_shard_blocks(model, model.model.layers, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    merger = Merger(model, optimizer, PMAConfig(method="wma", window=3, interval_steps=1))
    for step in range(4):
        hf_train_step(model, optimizer, step, rank, world_size)
        merger.step()
    probe = hf_batch(99)[:2]
    with torch.no_grad(), merger.swapped():
        logits = model(input_ids=probe).logits
        merged = full_state(model)
    with merger.swapped("cosine", last=2, stride=2):
        strided = full_state(model)
    live = full_state(model)
    out = Path(root)
    with counted_calls((DTensor, "full_tensor")) as calls:
        merger.export(out / "hf", max_shard_size="24KB")
    merger.export(out / "hf_bf16", dtype="bfloat16")
    merger.export(out / "dcp", format="dcp")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "pma": merger}, checkpoint_id=str(out / "ckpt"))
    assert all(torch.equal(live[k], v) for k, v in full_state(model).items()), (
        "export left weights changed"
    )
    calls = dict(calls)
    if rank == 0:
        return {
            "logits": logits,
            "merged": merged,
            "probe": probe,
            "calls": calls,
            "strided": strided,
        }
    return {"calls": calls}


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize(
    "kind, world_size, replicas",
    [("llama", 1, 1), ("mixtral", 2, 1), ("llama", 4, 1), ("mixtral", 4, 1), ("llama", 4, 2)],
)
def test_export_loads_with_transformers_and_matches_swapped_logits(
    tmp_path: Path, kind: str, world_size: int, replicas: int
) -> None:
    """Also HSDP (2 replica groups of 2): each tensor is gathered within the writer's group,
    and no rank gathers what every other rank holds or reports (files are committed by the
    first rank alone)."""
    results = run_ranks(_export_worker, world_size, str(tmp_path), kind, replicas)
    result = results[0]
    gathers = (
        "full_tensor",
        "all_gather",
        "all_gather_into_tensor",
        "all_reduce",
        "all_gather_object",
    )
    for r in results:
        assert not any(r["calls"].get(name) for name in gathers), r["calls"]
    sends = sum(r["calls"].get("send", 0) for r in results)
    assert sends == sum(r["calls"].get("recv", 0) for r in results), "pieces go to writers only"
    assert (sends > 0) == (world_size > 1), results[0]["calls"]
    for name in ("hf", "hf_bf16", "dcp"):
        assert verify_export(tmp_path / name) == [], name

    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > world_size, "the small shard size must spread files over every rank"
    if kind == "mixtral":
        experts = {k for k in index["weight_map"] if ".experts." in k}
        assert len(experts) == 2 * 4 * 3, sorted(experts)[:6]
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in experts
    else:
        assert "lm_head.weight" not in index["weight_map"], "tied weight saved twice"

    loaded = _load(tmp_path / "hf")
    state = {k: v for k, v in loaded.state_dict().items() if k in result["merged"]}
    assert_bitwise_equal(state, result["merged"], "fp32 export")
    with torch.no_grad():
        logits = loaded(input_ids=result["probe"]).logits
    assert_close_rel({"logits": logits}, {"logits": result["logits"]}, 1e-5, "logits")

    bf16 = _load(tmp_path / "hf_bf16")
    assert bf16.dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf_bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        logits16 = bf16(input_ids=result["probe"]).logits.float()
    assert_close_rel({"logits": logits16}, {"logits": result["logits"]}, 3e-2, "bf16 logits")

    template = {k: torch.empty_like(v) for k, v in result["merged"].items()}
    dcp.load(template, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert_bitwise_equal(template, result["merged"], "DCP export read at world size 1")

    for source, out in (("dcp", "from_dcp"), ("ckpt", "from_ckpt")):
        done = run_cli(
            "export", str(tmp_path / source), str(tmp_path / out), "--config", str(tmp_path / "hf")
        )
        assert done.returncode == 0, done.stderr
        assert verify_export(tmp_path / out) == []
        offline = {
            k: v for k, v in _load(tmp_path / out).state_dict().items() if k in result["merged"]
        }
        assert_bitwise_equal(offline, result["merged"], f"offline export from {source}")
    args = ("--method", "cosine", "--last", "2", "--stride", "2", "--config", str(tmp_path / "hf"))
    done = run_cli("export", str(tmp_path / "ckpt"), str(tmp_path / "strided"), *args)
    assert done.returncode == 0, done.stderr
    offline = {
        k: v for k, v in _load(tmp_path / "strided").state_dict().items() if k in result["strided"]
    }
    assert_bitwise_equal(offline, result["strided"], "offline cosine, last=2, stride=2")
