"""A save says where its elements lie in O(parameters), however many ranks wrote it.

The real FSDP2 layouts of Llama-3-70B and Mixtral-8x22B ranks of 64 and 1024 (PyTorch's fake
process group, models on the meta device; one process per simulated rank, since PyTorch shares
equal device meshes within a process) are described as each rank describes itself to rank 0,
planned as rank 0 plans a save, and read back as a resuming rank reads the index: what a rank
sends is one shift, the index does not grow with the world, and the copies it plans are the ones
torch.chunk's row arithmetic gives.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pma_dist import Merger, PMAConfig, PMAStateError
from pma_dist.backends import Fragment, Shard
from pma_dist.state._layout import RankLayout, describe_rank, plan_save, shard_writes, shifted
from pma_dist.state._runs import SavedRuns, plan_copies
from pma_dist.testing import assert_bitwise_equal
from tests.support.models import full_state, make_model

SIMULATE = """
import json, sys
from pma_dist.state._layout import exchanged
from pma_dist.tools import simulated_merger
model, world, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with simulated_merger(model, world, 1, rank, 2, 1) as merger:
    shards = merger.backend.shards()
    print(json.dumps({"fragments": exchanged(shards), "buffers": [s.buffer for s in shards]}))
"""


def _simulated(model: str, world: int, rank: int) -> tuple[list, list[bool]]:
    """Rank ``rank`` of ``world``'s fragments as a save exchanges them, and which shards are
    buffers."""
    done = subprocess.run(
        [sys.executable, "-c", SIMULATE, model, str(world), str(rank)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    fragments = [[(p, tuple(shape), *rest) for p, shape, *rest in s] for s in out["fragments"]]
    return fragments, out["buffers"]


def _as_shards(fragments: list) -> list[Shard]:
    return [
        Shard("s", torch.empty(0), (), None, tuple(Fragment(*f) for f in shard))
        for shard in fragments
    ]


CASES = [("llama3-70b", 64, 0), ("llama3-70b", 64, 5), ("llama3-70b", 64, 63)]
CASES += [("llama3-70b", 1024, 0), ("llama3-70b", 1024, 5), ("llama3-70b", 1024, 1023)]
CASES += [("llama3-70b", 512, 5), ("mixtral-8x22b", 1024, 0), ("mixtral-8x22b", 1024, 1023)]


@pytest.fixture(scope="module")
def layouts() -> dict:
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CASES, pool.map(lambda case: _simulated(*case), CASES)))


def _plan_for_every_rank(template: list, buffers: list[bool], world: int):
    """Rank 0's plan when every rank r of ``world`` describes itself as the sampled ranks do:
    shift r, buffers (whole on every rank) as shift 0."""
    exceptions = {i: 0 for i, buffer in enumerate(buffers) if buffer}
    return plan_save(template, [RankLayout(r, exceptions if r else {}) for r in range(world)])


def test_each_rank_sends_one_shift_and_the_index_does_not_grow(layouts: dict) -> None:
    sizes = {}
    for model, world in (("llama3-70b", 64), ("llama3-70b", 1024), ("mixtral-8x22b", 1024)):
        template, buffers = layouts[model, world, 0]
        for rank in (5, world - 1):
            if (model, world, rank) not in layouts:
                continue
            own, _ = layouts[model, world, rank]
            described = describe_rank(own, template)
            assert described.shift == rank, (model, world, rank, described.shift)
            assert all(buffers[i] and k == 0 for i, k in described.exceptions.items()), (
                model,
                world,
                rank,
                described.exceptions,
            )
        plan = _plan_for_every_rank(template, buffers, world)
        params = len({f[0] for shard in template for f in shard})
        assert len(plan.params) == params
        series = sum(len(p["runs"]) for p in plan.params)
        assert series == sum(map(len, template)), "one run series per fragment of rank 0"
        writers = [r for r, (follows, _) in enumerate(plan.writes) if follows]
        assert writers == list(range(world))
        sizes[model, world] = len(json.dumps(plan.params))
    assert sizes["llama3-70b", 1024] < 1.02 * sizes["llama3-70b", 64], sizes
    assert sizes["llama3-70b", 1024] < 200 * 723, "about one series of 7 numbers per parameter"


def _rows_chunk(shape: tuple[int, ...], world: int) -> int:
    """Elements per rank under FSDP2's dim-0 chunking (torch.chunk: ceil(rows / world) rows)."""
    return -(-shape[0] // world) * math.prod(shape[1:])


@pytest.mark.parametrize("model", ["llama3-70b", "mixtral-8x22b"])
def test_resuming_ranks_plan_their_copies_from_the_series(layouts: dict, model: str) -> None:
    """Same world: rank r reads its own file, offsets unchanged. Llama from 1024 to 512 ranks:
    each element comes from the file torch.chunk's arithmetic puts it in."""
    template, buffers = layouts[model, 1024, 0]
    plan = _plan_for_every_rank(template, buffers, 1024)
    saved = SavedRuns.from_index(json.loads(json.dumps(plan.params)), 1024, "index")
    for rank in (0, 1023):
        own, _ = layouts[model, 1024, rank]
        for copy in plan_copies(saved, _as_shards(own)):
            expected_file = 0 if buffers[copy.dst_shard] else rank
            assert (copy.file, copy.src_shard, copy.src) == (
                expected_file,
                copy.dst_shard,
                copy.dst,
            ), (rank, copy)
    if model != "llama3-70b":
        return
    resharded, _ = layouts[model, 512, 5]
    shards = _as_shards(resharded)
    covered = 0
    for copy in plan_copies(saved, shards):
        (frag,) = shards[copy.dst_shard].fragments
        element = frag.start + copy.dst - frag.local_start
        chunk = _rows_chunk(frag.shape, 1024)
        assert copy.file == element // chunk, copy
        assert copy.src == element - copy.file * chunk, copy
        assert (element + copy.numel - 1) // chunk == copy.file, "a copy stays in one file"
        covered += copy.numel
    assert covered == sum(f.numel for s in shards for f in s.fragments)


def _random_ranks(rng: random.Random) -> list[list[list]]:
    """Per rank, shards of fragments: rank 0's at random; each other rank's mostly rank 0's
    shifted by the rank's own k, some shifted by another k, emptied or replaced by other runs,
    and now and then a shard more or fewer (every way a rank can differ from rank 0)."""
    shapes = {
        f"p{i}": tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3)))
        for i in range(rng.randint(1, 4))
    }

    def runs(count: int) -> list:
        out, local = [], 0
        for _ in range(count):
            name = rng.choice(list(shapes))
            start = rng.randrange(math.prod(shapes[name]))
            numel = rng.randint(1, math.prod(shapes[name]) - start)
            out.append((name, shapes[name], start, numel, local))
            local += numel + rng.randint(0, 2)
        return out

    template = [runs(rng.randint(0, 3)) for _ in range(rng.randint(1, 4))]
    ranks = [template]
    for _ in range(rng.randint(0, 8)):
        k, shards = rng.randint(0, 4), []
        for fragments in template:
            roll = rng.random()
            if roll < 0.75:
                shards.append(shifted(fragments, k if roll < 0.6 else rng.randint(0, 4)))
            else:
                shards.append([] if roll < 0.85 else runs(rng.randint(1, 3)))
        if rng.random() < 0.1:
            shards.append(runs(2))
        if rng.random() < 0.1:
            shards.pop()
        ranks.append(shards)
    return ranks


@pytest.mark.parametrize("first", range(0, 600, 150))
def test_the_series_name_exactly_what_the_files_hold(first: int) -> None:
    """Random layouts: the runs the index names are exactly the fragments the ranks write, and
    every rank's copies move the elements it holds from where they were written."""
    for case in range(first, first + 150):
        ranks = _random_ranks(random.Random(case))
        layouts = [describe_rank(own, ranks[0]) for own in ranks]
        plan = plan_save(ranks[0], layouts)
        written = [
            [own if write else [] for own, write in zip(shards, shard_writes(layout, d, shards))]
            for shards, layout, d in zip(ranks, layouts, plan.writes)
        ]
        held = {
            (file, shard, param, start, numel, local)
            for file, shards in enumerate(written)
            for shard, fragments in enumerate(shards)
            for param, _, start, numel, local in fragments
        }
        saved = SavedRuns.from_index(json.loads(json.dumps(plan.params)), len(ranks), "index")
        named = set()
        for param, series in saved.series.items():
            total = math.prod(saved.shapes[param])
            for start, numel, file, shard, local in (
                run for s in series for run in s.overlapping(total, 0, total)
            ):
                named.add((file, shard, param, start, numel, local))
        assert named == held, case
        for shards in ranks:
            copies = plan_copies(saved, _as_shards(shards))
            assert sum(c.numel for c in copies) == sum(f[3] for s in shards for f in s), case
            for c in copies:
                assert _element(shards[c.dst_shard], c.dst, c.numel) == _element(
                    written[c.file][c.src_shard], c.src, c.numel
                ), (case, c)


def _element(fragments: list, local: int, numel: int) -> tuple[str, int]:
    """The parameter and first element that ``numel`` elements at ``local`` of a shard with
    ``fragments`` hold (all within one fragment)."""
    (found,) = [
        (param, start + local - at)
        for param, _, start, count, at in fragments
        if at <= local and local + numel <= at + count
    ]
    return found


def test_a_malformed_index_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    model = make_model()
    config = PMAConfig(window=2, interval_steps=1)
    merger = Merger(model, None, config)
    merger.snapshot()
    merger.save(tmp_path)
    index_path = tmp_path / "pma_index.json"
    index = json.loads(index_path.read_text())
    fresh = Merger(model, None, config)
    before = full_state(model)
    for edit, message in (
        (lambda run: run.__setitem__(3, 7), "names files beyond the 1 saved"),
        (lambda run: run.__setitem__(1, 0), "needs numel and count >= 1"),
        (lambda run: run.__setitem__(0, 10**9), "runs past the parameter"),
        (lambda run: run.__setitem__(2, 10**18), "runs past the parameter"),
        (lambda run: run.__setitem__(2, float("inf")), "not lists of 7 integers"),
        (lambda run: run.__setitem__(0, "0"), "not lists of 7 integers"),
        (lambda run: run.pop(), "not lists of 7 integers"),
    ):
        edited = json.loads(json.dumps(index))
        edit(edited["params"][0]["runs"][0])
        index_path.write_text(json.dumps(edited))
        with pytest.raises(PMAStateError, match=message) as err:
            fresh.load(tmp_path)
        assert edited["params"][0]["name"] in str(err.value)
        assert fresh.num_snapshots == 0
    assert_bitwise_equal(full_state(model), before, "nothing changed")
