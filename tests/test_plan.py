"""``pma-dist plan``: the real FSDP2 layout code for one rank of up to 1024, on the fake process
group with a meta-device model, against per-rank bytes worked out from the definitions."""

from __future__ import annotations

import json
import math

import pytest

from pma_dist.tools import meta_model, model_config, plan, suggested_interval_tokens
from tests.support.cli import run_cli

WINDOW = 10


def _rank0_rows(rows: int, shards: int) -> int:
    """Rows of a dim-0 sharded tensor that rank 0 holds (``torch.chunk``: ceil(rows / shards))."""
    return min(rows, math.ceil(rows / shards))


@pytest.fixture(scope="module")
def llama_shapes() -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in meta_model(model_config("llama3-70b")).parameters()]


@pytest.mark.parametrize("world, replicas", [(8, 1), (64, 1), (512, 1), (1024, 1), (1024, 2)])
def test_per_rank_cost_falls_with_the_shard_group(world, replicas, llama_shapes) -> None:
    result = plan("llama3-70b", world, replicas=replicas, window=WINDOW)
    shards = world // replicas
    held = sum(_rank0_rows(s[0], shards) * math.prod(s[1:]) for s in llama_shapes)
    total = sum(math.prod(s) for s in llama_shapes)
    assert result.total_params == total
    assert result.local_params == held
    assert result.state_bytes_per_rank == WINDOW * 4 * held
    assert result.snapshot_bytes_per_rank == 2 * 4 * held, "read fp32 shard, write fp32 slot"
    assert result.resume_read_bytes_per_rank == WINDOW * 4 * held
    share = WINDOW * 4 * total / shards
    assert 1.0 <= result.state_bytes_per_rank / share < 1.02, "1/(W/R) within padding"
    largest = max(math.prod(s) for s in llama_shapes) * 4
    assert result.export_peak_bytes_per_rank == largest + 5 * 10**9, "flat in the world size"


def test_interval_follows_the_papers_anchors() -> None:
    assert suggested_interval_tokens(7e9) == 4e9
    assert suggested_interval_tokens(13e9) == 8e9
    assert suggested_interval_tokens(100e9) == 80e9
    assert 8e9 < suggested_interval_tokens(70e9) < 80e9


def test_cli_plans_an_moe_and_names_bad_input(tmp_path) -> None:
    done = run_cli("plan", "--model", "mixtral-8x22b", "--world", "64", "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    for key in (
        "state_bytes_per_rank",
        "snapshot_bytes_per_rank",
        "resume_read_bytes_per_rank",
        "export_peak_bytes_per_rank",
        "suggested_interval_tokens",
    ):
        assert figures[key] > 0, key
    share = figures["total_params"] / 64
    assert share <= figures["local_params"] < 1.02 * share, "experts sharded within experts"
    # Sharded by expert ([8, 2I, H] on dim 0 over 64 ranks), rank 0 holds a whole expert.
    by_expert = run_cli("plan", "--model", "mixtral-8x22b", "--world", "64", "--experts-dim", "0")
    assert by_expert.returncode == 0, by_expert.stderr
    local = float(by_expert.stdout.split("local_params")[1].split()[0])
    assert local > 56 * 3 * 16384 * 6144, "a whole expert of every layer"
    bad = run_cli("plan", "--model", str(tmp_path / "missing"), "--world", "8")
    assert bad.returncode == 2 and "not a shipped architecture" in bad.stderr, bad.stderr
    uneven = run_cli("plan", "--model", "llama3-70b", "--world", "10", "--replicas", "3")
    assert uneven.returncode == 2 and "--world 10 --replicas 3" in uneven.stderr, uneven.stderr


@pytest.mark.parametrize("world", [64, 1024])
def test_a_compressed_window_costs_its_code_per_element(world, llama_shapes) -> None:
    """bf16: a float32 base and nine 2-byte differences; fp8: nine 1-byte differences with one
    scale byte per 128 elements of a row (a 1-D tensor cut across ranks: one per element)."""
    held = sum(_rank0_rows(s[0], world) * math.prod(s[1:]) for s in llama_shapes)
    rows = [(s, _rank0_rows(s[0], world)) for s in llama_shapes]
    scales = sum(r * math.prod(s[1:-1]) * -(-s[-1] // 128) if len(s) > 1 else r for s, r in rows)
    bf16 = plan("llama3-70b", world, window=WINDOW, compression="bf16")
    fp8 = plan("llama3-70b", world, window=WINDOW, compression="fp8")
    assert bf16.state_bytes_per_rank == 4 * held + (WINDOW - 1) * 2 * held
    assert fp8.state_bytes_per_rank == 4 * held + (WINDOW - 1) * (held + scales)
    assert bf16.state_bytes_per_rank / held <= 22.5 and fp8.state_bytes_per_rank / held <= 13.5
    assert bf16.resume_read_bytes_per_rank == bf16.state_bytes_per_rank
    assert bf16.snapshot_bytes_per_rank == 4 * held + 2 * 4 * held + 2 * held, "14 B an element"
    done = run_cli("plan", "--model", "llama3-70b", "--world", str(world), "--compression", "fp8")
    assert done.returncode == 0 and "compression" in done.stdout, done.stderr
