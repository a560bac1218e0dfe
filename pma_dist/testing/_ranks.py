"""Run a function on several real ranks (spawned processes, gloo) with a hard deadline.

Each rank writes its return value (``torch.save``) or its traceback to a file; the parent
waits for all of them, kills every rank on the first failure or at the deadline, and reports,
so a broken collective fails a test instead of hanging CI.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLLECTIVE_TIMEOUT_S = 60
"""Every collective of a test rank fails after this long instead of waiting forever."""

FILL_UNINITIALIZED_ENV = "PMA_TEST_FILL_UNINITIALIZED"
"""Set to 1 (``make test`` does) to run every test rank with uninitialized memory filled with
NaN, so that a result that reads padding or an unwritten buffer fails every time, not one run
in six."""


def fill_uninitialized_memory() -> None:
    """Make ``torch.empty`` and friends return NaN-filled floating memory in this process."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True


@dataclass
class RankOutcome:
    """How one rank ended: its exit code, and its return value or traceback."""

    exitcode: int | None
    result: Any = None
    error: str | None = None


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out: str,
    collective_timeout: float,
    backend: str,
    args: tuple,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if os.environ.get(FILL_UNINITIALIZED_ENV) == "1":
        fill_uninitialized_memory()
    result_path = Path(out) / f"rank{rank}.pt"
    try:
        if torch.cuda.is_available() and "nccl" in backend:
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        result = fn(rank, world_size, *args)
        torch.save(result, result_path.with_suffix(".tmp"))
        result_path.with_suffix(".tmp").rename(result_path)
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - peers that died already failed the run their own way
        pass
    # Every rank is past its last collective: leave without running library teardown
    # (DeepSpeed's shared-memory communicator can abort in interpreter shutdown).
    os._exit(0)


def run_rank_outcomes(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    collective_timeout: float = COLLECTIVE_TIMEOUT_S,
    stop_on_failure: bool = True,
    backend: str = "gloo",
) -> list[RankOutcome]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; how each one ended.

    ``backend`` is the process group's (gloo; ``"cpu:gloo,cuda:nccl"`` for GPU ranks, one
    device each).
    ``fn`` must be importable by name (a module-level function). With ``stop_on_failure`` the
    other ranks are killed as soon as one fails; without it they run until they end on their
    own (e.g. to see that survivors of a killed rank fail by themselves). Ranks still running
    at ``timeout`` seconds are killed and have ``exitcode`` None (ranks are not daemonic, so
    that they may start processes of their own; they are killed all the same).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="pma_ranks_") as out:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, r, world_size, port, out, collective_timeout, backend, args),
                daemon=False,  # a rank may start processes (Megatron's checkpoint writers)
            )
            for r in range(world_size)
        ]
        try:
            for p in procs:
                p.start()
        finally:
            if saved_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved_threads
        deadline = time.monotonic() + timeout
        timed_out = set()
        try:
            while any(p.is_alive() for p in procs):
                if stop_on_failure and any(p.exitcode not in (None, 0) for p in procs):
                    break
                if time.monotonic() > deadline:
                    timed_out = {r for r, p in enumerate(procs) if p.is_alive()}
                    break
                for p in procs:
                    p.join(timeout=0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
        import torch

        outcomes = []
        for r, p in enumerate(procs):
            result_path, error_path = Path(out) / f"rank{r}.pt", Path(out) / f"rank{r}.err"
            outcomes.append(
                RankOutcome(
                    exitcode=None if r in timed_out else p.exitcode,
                    result=torch.load(result_path, weights_only=False)
                    if result_path.exists()
                    else None,
                    error=error_path.read_text() if error_path.exists() else None,
                )
            )
        return outcomes


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    backend: str = "gloo",
) -> list[Any]:
    """Like :func:`run_rank_outcomes`, but every rank must succeed: their return values.

    Raises ``RuntimeError`` with the traceback of every failing rank.
    """
    outcomes = run_rank_outcomes(fn, world_size, *args, timeout=timeout, backend=backend)
    errors = [f"--- rank {r} ---\n{o.error}" for r, o in enumerate(outcomes) if o.error]
    if errors:
        codes = [(r, o.exitcode) for r, o in enumerate(outcomes)]
        raise RuntimeError(
            f"{fn.__name__} failed on {world_size} ranks (rank, exit code: {codes}):\n"
            + "\n".join(errors)
        )
    bad = [(r, o.exitcode) for r, o in enumerate(outcomes) if o.exitcode != 0]
    if bad:
        raise RuntimeError(f"{fn.__name__}: ranks ended abnormally (rank, exit code): {bad}")
    return [o.result for o in outcomes]
