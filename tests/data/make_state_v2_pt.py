"""Writes the format-2 ``.pt`` per-rank state fixture under tests/data/state_v2_pt (run once, at
commit 89b828f, the last commit that wrote per-rank state as ``torch.save`` files; kept to show
how it was made).

One process, a TinyLM whose head weight is scaled by 1.01 before each of 3 snapshots, a window-2
SMA Merger, saved with ``Merger.save``: the state holds snapshots 2 and 3.

    python -m tests.data.make_state_v2_pt
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

HERE = Path(__file__).parent / "state_v2_pt"


def saved_run():
    """The model and Merger of the fixture, snapshots taken (deterministic)."""
    from pma_dist import Merger, PMAConfig
    from tests.support.models import make_model

    model = make_model()
    merger = Merger(model, None, PMAConfig(method="sma", window=2, interval_steps=1))
    snapshots = []
    for _ in range(3):
        with torch.no_grad():
            model.head.weight.mul_(1.01)
        merger.step()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return model, merger, snapshots


def write(directory: Path) -> None:
    """Save the run's state under ``directory``, replacing what is there."""
    _, merger, _ = saved_run()
    shutil.rmtree(directory, ignore_errors=True)
    merger.save(directory)


def main() -> None:
    write(HERE)


if __name__ == "__main__":
    main()
