"""Resume reads O(own share): state saved at world 4 and loaded at 4 and at 2, each rank reading
at most 1.25x its share of the averaging state plus headers, counted by the reader and by the
kernel (``rchar`` in /proc/self/io: every byte passed through a read call), for the per-rank
files and for DCP. Tensor sizes are odd, so shards of 2 ranks straddle shards of 4."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from pma_dist import Merger, PMAConfig
from pma_dist.testing import assert_bitwise_equal, run_ranks

WINDOW = 2


class Wide(nn.Module):
    """A few parameters of about a million elements each, no size divisible by 2 or 4."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1999, 513)
        self.proj = nn.Linear(1001, 997)
        self.out = nn.Linear(997, 1003, bias=False)


def _model(world_size: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    from pma_dist.tools import fully_shard_blocks

    torch.manual_seed(0)
    model = Wide()
    mesh = init_device_mesh("cpu", (world_size,))
    return fully_shard_blocks(model, [model.embed, model.proj, model.out], mesh)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _drop_cache(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def _save_worker(rank: int, world_size: int, root: str) -> dict:
    model = _model(world_size)
    merger = Merger(model, None, PMAConfig(window=WINDOW, interval_steps=1))
    for scale in (1.01, 1.02, 1.03):
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().mul_(scale)
        merger.snapshot()
    merger.save(Path(root) / "files")
    dcp.save({"pma": merger}, checkpoint_id=str(Path(root) / "dcp"))
    with merger.swapped():
        return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


def _load_worker(rank: int, world_size: int, root: str) -> dict:
    from pma_dist.state import plan_files

    model = _model(world_size)
    merger = Merger(model, None, PMAConfig(window=WINDOW, interval_steps=1))
    share = sum(sum(f.numel for f in s.fragments) * 4 * WINDOW for s in merger.backend.shards())
    directory = Path(root) / "files"
    plan = plan_files(directory, merger.backend, merger.header(), merger._state)
    headers = sum(
        8 + int.from_bytes((directory / name).read_bytes()[:8], "little")
        for name in plan.files_opened
    )
    index = (directory / "pma_index.json").stat().st_size
    _drop_cache(Path(root))
    before = _rchar()
    merger.load(directory)
    files_rchar = _rchar() - before
    fresh = Merger(model, None, PMAConfig(window=WINDOW, interval_steps=1))
    metadata = (Path(root) / "dcp" / ".metadata").stat().st_size
    _drop_cache(Path(root))
    before = _rchar()
    dcp.load({"pma": fresh}, checkpoint_id=str(Path(root) / "dcp"))
    dcp_rchar = _rchar() - before
    with merger.swapped():
        merged = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    return {
        "share": share,
        "headers": headers,
        "index": index,
        "metadata": metadata,
        "counted": plan.bytes_read,
        "opened": plan.files_opened,
        "files_rchar": files_rchar,
        "dcp_rchar": dcp_rchar,
        "merged": merged if rank == 0 else {},
        "same_from_dcp": all(
            torch.equal(a, b)
            for a, b in zip(merger.merged_shards().values(), fresh.merged_shards().values())
        ),
    }


def test_resume_reads_only_its_share(tmp_path: Path) -> None:
    root = str(tmp_path)
    saved = run_ranks(_save_worker, 4, root)[0]
    for world in (4, 2):
        results = run_ranks(_load_worker, world, root)
        for rank, r in enumerate(results):
            where = f"rank {rank} of {world}"
            assert r["counted"] <= 1.25 * r["share"] + r["headers"], (where, r)
            assert r["files_rchar"] <= 1.25 * r["share"] + r["headers"] + r["index"], (where, r)
            assert r["dcp_rchar"] <= 1.25 * r["share"] + r["metadata"], (where, r)
            assert r["same_from_dcp"], where
            opened = [int(name.rsplit("rank", 1)[1].split(".")[0]) for name in r["opened"]]
            if world == 4:
                assert opened == [rank], (where, opened)
            else:
                assert len(opened) <= 3 and rank * 2 + 1 in opened, (where, opened)
        assert_bitwise_equal(results[0]["merged"], saved, f"the saved merge, loaded at {world}")


def _replicas_worker(rank: int, world_size: int, root: str) -> dict:
    """HSDP, 2 replica groups of 2 (and every rank's buffers-free plain copy of the same model):
    each element is saved by one rank, and the state loads back at 2 ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.support.models import make_model

    torch.manual_seed(0)
    hsdp = make_model()
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
    plain = make_model()
    out = {}
    for name, model in (("hsdp", hsdp), ("plain", plain)):
        merger = Merger(model, None, PMAConfig(window=WINDOW, interval_steps=1))
        for _ in range(WINDOW):
            merger.snapshot()
        merger.save(Path(root) / name)
        out[name] = {k: v.clone() for k, v in merger.merged_shards().items()}
    return out


def _replicas_load_worker(rank: int, world_size: int, root: str) -> dict:
    from tests.support.models import make_model, shard_fsdp2

    config = PMAConfig(window=WINDOW, interval_steps=1)
    merger = Merger(shard_fsdp2(make_model(), world_size), None, config)
    merger.load(Path(root) / "hsdp")
    plain = Merger(make_model(), None, config)
    plain.load(Path(root) / "plain")
    plain.check_replicas()
    return {"hsdp": merger.merged_shards(), "plain": plain.merged_shards()}


def test_replicas_are_saved_once(tmp_path: Path) -> None:
    import json

    saved = run_ranks(_replicas_worker, 4, str(tmp_path))
    for name, writers in (("hsdp", {0, 1}), ("plain", {0})):
        index = json.loads((tmp_path / name / "pma_index.json").read_text())
        assert all(len(p["runs"]) == 1 for p in index["params"]), "one series per parameter"
        holding = {
            run[3] + i * run[4] for p in index["params"] for run in p["runs"] for i in range(run[2])
        }
        assert holding == writers, (name, holding)
        sizes = sorted(p.stat().st_size for p in (tmp_path / name).glob("pma_*_rank*"))
        assert sizes[-len(writers) - 1] < 1024, (name, sizes)
    loaded = run_ranks(_replicas_load_worker, 2, str(tmp_path))
    for rank, r in enumerate(loaded):
        assert_bitwise_equal(r["plain"], saved[3]["plain"], "plain state saved by rank 0 only")
        assert_bitwise_equal(r["hsdp"], saved[2 + rank]["hsdp"], "HSDP state from replica 0")
