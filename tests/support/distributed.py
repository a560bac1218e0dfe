"""Run a function on several real ranks (spawned processes, gloo) with a hard deadline.

Each rank writes its return value (``torch.save``) or its traceback to a file; the parent
waits for all of them, kills every rank on the first failure or at the deadline, and raises
with the failing rank's traceback, so a broken collective fails a test instead of hanging CI.
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
from pathlib import Path
from typing import Any

COLLECTIVE_TIMEOUT_S = 60
"""Every collective of a test rank fails after this long instead of waiting forever."""


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, out: str, args: tuple
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
    result_path = Path(out) / f"rank{rank}.pt"
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        result = fn(rank, world_size, *args)
        torch.save(result, result_path.with_suffix(".tmp"))
        result_path.with_suffix(".tmp").rename(result_path)
        dist.destroy_process_group()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; their return values.

    ``fn`` must be importable by name (a module-level function). Raises ``RuntimeError`` with
    the traceback of the first failing rank, or on the deadline ``timeout`` (seconds).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="pma_ranks_") as out:
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, port, out, args), daemon=True)
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
        try:
            while any(p.is_alive() for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{fn.__name__} on {world_size} ranks exceeded {timeout}s")
                for p in procs:
                    p.join(timeout=0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
        errors = sorted(Path(out).glob("rank*.err"))
        if errors:
            raise RuntimeError(
                f"{fn.__name__} failed on {world_size} ranks:\n"
                + "\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in errors)
            )
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{fn.__name__}: ranks exited abnormally (rank, code): {bad}")
        import torch

        return [
            torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)
        ]
