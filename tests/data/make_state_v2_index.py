"""Writes the indexed format-2 state fixture of earlier releases under
tests/data/state_v2_index (run once, at commit 99d1a09, the last commit whose ``pma_index.json``
listed every rank's fragments under ``files``; kept to show how it was made).

The run of tests/data/make_state_v2_pt.py, saved the same way: the state holds snapshots 2
and 3.

    python -m tests.data.make_state_v2_index
"""

from __future__ import annotations

from pathlib import Path

from tests.data.make_state_v2_pt import saved_run, write

HERE = Path(__file__).parent / "state_v2_index"


__all__ = ["HERE", "saved_run"]


def main() -> None:
    write(HERE)


if __name__ == "__main__":
    main()
