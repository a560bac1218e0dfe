"""Test your own setup the way pma_dist tests itself.

* :func:`run_ranks` / :func:`run_rank_outcomes`: run a function on several real ranks (spawned
  processes, gloo by default) with a deadline on the run and a timeout on every collective, so
  a broken collective fails a test instead of hanging it; ``PMA_TEST_FILL_UNINITIALIZED=1``
  runs every rank with uninitialized memory filled with NaN.
* :func:`merge_reference` / :func:`window_reference`: float64 merges written from the paper's
  definitions (:func:`reference_weights`: the weights themselves), and
  :func:`assert_close_rel` / :func:`assert_bitwise_equal` to compare with them.
* :func:`assert_compressed_merge` / :func:`compressed_error_bounds`: how far a compressed
  window's merge may lie from the float64 merge, from the codes' definitions.
* :func:`shard_blocks`: FSDP2 over a 1-D mesh, per block and at the root.

    from pma_dist.testing import run_ranks, window_reference, assert_close_rel
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..tools import fully_shard_blocks
from ._compressed import assert_compressed_merge, compressed_error_bounds
from ._ranks import (
    FILL_UNINITIALIZED_ENV,
    RankOutcome,
    fill_uninitialized_memory,
    free_port,
    run_rank_outcomes,
    run_ranks,
)
from ._reference import (
    assert_bitwise_equal,
    assert_close_rel,
    max_rel_error,
    merge_reference,
    reference_weights,
    window_reference,
)

__all__ = [
    "FILL_UNINITIALIZED_ENV",
    "RankOutcome",
    "assert_bitwise_equal",
    "assert_compressed_merge",
    "assert_close_rel",
    "compressed_error_bounds",
    "fill_uninitialized_memory",
    "free_port",
    "max_rel_error",
    "merge_reference",
    "reference_weights",
    "run_rank_outcomes",
    "run_ranks",
    "shard_blocks",
    "window_reference",
]


def shard_blocks(
    model: nn.Module, blocks: Iterable[nn.Module], world_size: int, device_type: str = "cpu"
) -> nn.Module:
    """``fully_shard`` each of ``blocks`` and then ``model`` over a 1-D mesh of ``world_size``."""
    from torch.distributed.device_mesh import init_device_mesh

    return fully_shard_blocks(model, blocks, init_device_mesh(device_type, (world_size,)))
