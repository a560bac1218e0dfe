"""Parameters sharded on a dimension other than 0: tensor parallelism that splits columns
(``RowwiseParallel`` weights are ``Shard(1)``) and MoE expert tensors ``[experts, 2I, H]`` that
FSDP2 shards on dimension 1 (``shard_placement_fn``, as MoE runs do once there are more ranks
than experts). A rank's shard is then a box of the parameter: one run per leading index. The
merges equal float64 from the gathered snapshots, per-rank files reload them bitwise, and the
HF export (each piece sent to its writer) loads with transformers. An fp8 window keeps its
block scales in a DCP checkpoint under either tensor-parallel mesh, a row split over two ranks
or a ``Shard(1)`` over a mesh dimension of one rank (rows whole)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from pma_dist import Merger, PMAConfig
from pma_dist.testing import (
    assert_bitwise_equal,
    assert_close_rel,
    assert_compressed_merge,
    reference_weights,
    run_ranks,
    window_reference,
)

SNAPSHOTS = 3


def _full(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _tp_model(world_size: int, mesh_shape: tuple[int, int] | None = None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh_shape = mesh_shape or (1, world_size)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 14), torch.nn.ReLU(), torch.nn.Linear(14, 7))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return fully_shard(model, mesh=mesh["dp"])


def _moe_model(world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from tests.support.hf_models import make_hf_model

    model = make_hf_model("mixtral", seed=0)
    mesh = init_device_mesh("cpu", (world_size,))

    def placement(param):
        return Shard(1) if param.ndim == 3 else Shard(0)

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    return fully_shard(model, mesh=mesh)


def _worker(rank: int, world_size: int, root: str, kind: str) -> dict:
    model = _tp_model(world_size) if kind == "tp" else _moe_model(world_size)
    merger = Merger(model, None, PMAConfig(method="wma", window=SNAPSHOTS, interval_steps=1))
    out = {"placements": sorted({str(p.placements) for p in model.parameters()})}
    snapshots = []
    for step in range(SNAPSHOTS):
        with torch.no_grad():
            for p in model.parameters():
                local = p.to_local()
                local.copy_(local * 1.01 + 0.01 * (step + 1) * (rank + 1))
        merger.snapshot()
        snapshots.append(_full(model))
    with merger.swapped():
        merged = _full(model)
    merger.save(Path(root) / "state")
    again = Merger(model, None, PMAConfig(method="wma", window=SNAPSHOTS, interval_steps=1))
    again.load(Path(root) / "state")
    with again.swapped():
        out["reloaded"] = _full(model)
    merger.export(Path(root) / "hf")
    if rank == 0:
        out.update(snapshots=snapshots, merged=merged)
    return out


def _check(tmp_path: Path, kind: str) -> dict:
    from tests.support.hf_models import make_hf_model

    result = run_ranks(_worker, 2, str(tmp_path), kind)[0]
    assert any("Shard(dim=1)" in p for p in result["placements"]), result["placements"]
    expected = window_reference(result["snapshots"], SNAPSHOTS, "wma")
    assert_close_rel(result["merged"], expected, 1e-6, f"{kind} merge")
    assert_bitwise_equal(result["reloaded"], result["merged"], f"{kind} per-rank files")
    whole = torch.nn.Sequential(torch.nn.Linear(9, 14), torch.nn.ReLU(), torch.nn.Linear(14, 7))
    whole = whole if kind == "tp" else make_hf_model("mixtral", seed=0)
    unsharded = Merger(whole, None, PMAConfig(method="wma", window=SNAPSHOTS, interval_steps=1))
    unsharded.load(tmp_path / "state")
    merged = {k: v for k, v in unsharded.merged_shards().items() if k in result["merged"]}
    assert_bitwise_equal(merged, result["merged"], f"{kind} state resharded to whole tensors")
    return result


def test_column_sharded_tensor_parallel_weights_average(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    result = _check(tmp_path, "tp")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert_bitwise_equal(exported, result["merged"], "tp export")


def test_moe_experts_sharded_on_dimension_1_average_and_export(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = _check(tmp_path, "moe")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    merged = result["merged"]
    assert ".experts.gate_up_proj" in " ".join(merged)
    state = {k: v for k, v in loaded.items() if k in merged}
    assert set(state) == set(merged) - {"lm_head.weight"} or set(state) == set(merged)
    assert_bitwise_equal(state, {k: merged[k] for k in state}, "moe export")


def _fp8_dcp_worker(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp

    out = {}
    for mesh_shape in ((1, world_size), (world_size, 1)):
        model = _tp_model(world_size, mesh_shape)
        config = PMAConfig(method="wma", window=SNAPSHOTS, interval_steps=1, compression="fp8")
        merger = Merger(model, None, config)
        snapshots = []
        for step in range(SNAPSHOTS):
            with torch.no_grad():
                for p in model.parameters():
                    local = p.to_local()
                    local.copy_(local * 1.01 + 0.01 * (step + 1))  # replicas alike
            merger.snapshot()
            snapshots.append(_full(model))
        with merger.swapped():
            merged = _full(model)
        checkpoint = f"{root}/{mesh_shape[0]}x{mesh_shape[1]}"
        dcp.save({"pma": merger}, checkpoint_id=checkpoint)
        again = Merger(model, None, config)
        dcp.load({"pma": again}, checkpoint_id=checkpoint)
        with again.swapped():
            reloaded = _full(model)
        placements = sorted({str(p.placements) for p in model.parameters()})
        out[mesh_shape] = {
            "placements": placements,
            "snapshots": snapshots,
            "merged": merged,
            "reloaded": reloaded,
        }
    return out if rank == 0 else {}


def test_fp8_block_scales_save_as_dcp_under_either_tensor_parallel_mesh(tmp_path: Path) -> None:
    result = run_ranks(_fp8_dcp_worker, 2, str(tmp_path))[0]
    for mesh_shape, seen in result.items():
        assert any("Shard(dim=1)" in p for p in seen["placements"]), seen["placements"]
        weights = reference_weights("wma", SNAPSHOTS)
        what = f"mesh {mesh_shape}"
        assert_compressed_merge(seen["merged"], seen["snapshots"], weights, "fp8", what)
        assert_bitwise_equal(seen["reloaded"], seen["merged"], f"{what} DCP")
