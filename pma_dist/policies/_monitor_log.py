"""Where a merge monitor's figures go: a JSON-lines file always, TensorBoard events when
``tensorboard`` is installed, and the active Weights & Biases run when ``wandb`` has one.

Only one rank writes (the monitor decides which); every sink takes the same flat record.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

JSONL_NAME = "pma_monitor.jsonl"
"""The file of evaluation records under the monitor's ``log_dir``, one JSON object a line."""


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class MonitorLog:
    """Writes each evaluation record to the configured sinks."""

    def __init__(
        self, log_dir: str | Path | None, tensorboard: bool | None, wandb: bool | None
    ) -> None:
        self.path = Path(log_dir) / JSONL_NAME if log_dir is not None else None
        if tensorboard and log_dir is None:
            raise ValueError("MonitorConfig.tensorboard = True needs a log_dir for its events")
        if tensorboard and not _installed("tensorboard"):
            raise ValueError(
                "MonitorConfig.tensorboard = True but tensorboard is not installed "
                "(pip install tensorboard), or leave it None to log there only when installed"
            )
        use_tb = log_dir is not None and (
            tensorboard or tensorboard is None and _installed("tensorboard")
        )
        self._tensorboard = None
        if use_tb:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(log_dir))
        self._wandb = wandb

    def keep_first(self, evaluations: int) -> None:
        """Drop the records after evaluation ``evaluations`` (a resumed run repeats what came
        after its checkpoint); the file is rewritten whole, then swapped in."""
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["evaluation"] <= evaluations]
        if len(kept) == len(lines):
            return
        partial = self.path.with_suffix(".jsonl.partial")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as out:
                out.write(json.dumps(record) + "\n")
        scalars = _scalars(record)
        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, global_step=record["step"])
            self._tensorboard.flush()
        if self._wandb is not False and _installed("wandb"):
            import wandb

            if wandb.run is not None:
                wandb.log({**scalars, "pma/step": record["step"]})

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """``pma/live_loss``, ``pma/best_loss``, ``pma/best_so_far_loss`` and one
    ``pma/merge/<method>_N<n>_stride<s>`` per merge evaluated."""
    scalars = {
        "pma/live_loss": record["live_loss"],
        "pma/best_loss": record["best"]["loss"],
        "pma/best_so_far_loss": record["best_so_far"]["loss"],
    }
    for merge in record["merges"]:
        scalars[f"pma/merge/{_tag(merge['merge'])}"] = merge["loss"]
    return scalars


def _tag(merge: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", merge.replace("=", "")).strip("_")
