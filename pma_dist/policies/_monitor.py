"""The merge monitor (the paper's "checkpoint-merging monitor"): every K snapshots, rank a set
of merges from the ring on held-out data while training runs, log the figures, and keep the
best merge so far exported.

It is a :class:`~pma_dist.Merger` extension: its state (evaluations so far, the best merge and
its loss) is saved and restored with the Merger's, so a resumed run goes on comparing against
the best found before the interruption, and its log drops what the abandoned run wrote after
the checkpoint. Create the monitor before a DCP load, which reads only the keys the state dict
asks for; ``Merger.load`` hands a state loaded first to a monitor created later.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import _comm as comm
from ..config import PMAConfig
from ..core import MergeSpec
from ..merger import Merger, Selection, default_candidates
from ._monitor_log import MonitorLog

EXTENSION_NAME = "merge_monitor"
"""The name its state is saved under in the Merger's state."""


@dataclass
class MonitorConfig:
    """What a :class:`MergeMonitor` evaluates, when, and where the figures go."""

    every: int = 1
    """Evaluate after every ``every``-th snapshot taken (non-finite ones count)."""
    candidates: Sequence[MergeSpec | Mapping[str, Any]] | None = None
    """Merges to rank (``MergeSpec`` or its fields as a dict); those the held snapshots cannot
    span yet are left out. None: the default grid of :func:`~pma_dist.merger.select`."""
    log_dir: str | None = None
    """Where the first rank writes ``pma_monitor.jsonl`` and TensorBoard events; None: none."""
    best_dir: str | None = None
    """Where the best merge so far is exported (replaced only by a better one, atomically);
    None: no export."""
    export_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``Merger.export`` for that export (``format``, ``dtype``,
    ``config``, ...)."""
    tensorboard: bool | None = None
    """TensorBoard events in ``log_dir``: None when ``tensorboard`` is installed."""
    wandb: bool | None = None
    """Log to the active W&B run: None (or True) when ``wandb`` has one; False never."""

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"MonitorConfig.every = {self.every!r}: must be an integer >= 1")
        if self.candidates is not None:
            self.candidates = [_candidate(c) for c in self.candidates]
            if not self.candidates:
                raise ValueError("MonitorConfig.candidates = []: give at least one, or None")


def _from_dict(values: Mapping[str, Any]) -> MonitorConfig:
    known = set(MonitorConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"MonitorConfig: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return MonitorConfig(**values)


def _candidate(value: MergeSpec | Mapping[str, Any]) -> MergeSpec:
    if isinstance(value, MergeSpec):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"method", "last", "stride", "weights"}
        if not unknown and ("method" in value or "weights" in value):
            return MergeSpec(**value)
    raise ValueError(
        f"MonitorConfig.candidates: {value!r} is not a MergeSpec or a dict of method (or "
        "weights), last and stride"
    )


def _explicit(spec: MergeSpec, config: PMAConfig) -> MergeSpec:
    """``spec`` with what the config fills in spelled out (method, N, V; an unset stride is
    1), so that logs and the saved best name each merge whole."""
    spec = spec.resolved(config.method, config.last, config.stride)
    return replace(spec, stride=1) if spec.weights is None and spec.stride is None else spec


class MergeMonitor:
    """Evaluates merges every ``config.every`` snapshots; call :meth:`step` after each
    ``merger.step()`` on every rank (a few integer operations unless an evaluation is due).

    ``evaluate()`` returns the held-out loss of the model as it is when called; it runs on
    every rank and the losses are averaged over ranks (as in ``Merger.select``). An
    evaluation costs one merge and one ``evaluate`` per distinct candidate, plus one for the
    live model, and an export when the best merge improves.
    """

    def __init__(
        self,
        merger: Merger,
        evaluate: Callable[[], Any],
        config: MonitorConfig | Mapping[str, Any] | None = None,
    ) -> None:
        self.merger = merger
        self.evaluate = evaluate
        self.config = config if isinstance(config, MonitorConfig) else _from_dict(config or {})
        self.evaluations = 0
        """Evaluations run so far (resumed runs included)."""
        self.best: dict[str, Any] | None = None
        """The best merge so far: its fields, ``loss``, ``step``, ``tokens``, ``evaluation``."""
        self.evaluated_at = 0
        """:attr:`snapshots_taken` at the last evaluation."""
        writes = comm.rank(merger.process_group) == 0
        self._log = MonitorLog(
            self.config.log_dir if writes else None,
            self.config.tensorboard if writes else False,
            self.config.wandb if writes else False,
        )
        merger.add_extension(EXTENSION_NAME, self)

    @property
    def snapshots_taken(self) -> int:
        """Snapshots taken so far, the non-finite ones left out included."""
        return self.merger.num_snapshots + self.merger.num_skipped

    def step(self) -> Selection | None:
        """Evaluate if ``config.every`` snapshots were taken since the last evaluation."""
        if self.snapshots_taken - self.evaluated_at < self.config.every:
            return None
        return self.evaluate_now()

    def evaluate_now(self) -> Selection | None:
        """Rank the candidate merges now, log them, and export the best if it beats the best
        so far. Collective. None if no snapshot is held or no candidate fits yet."""
        self.evaluated_at = self.snapshots_taken
        self.merger.agree()
        held = self.merger.window_size
        grid = self.config.candidates or default_candidates(max(held, 1))
        explicit = (_explicit(c, self.merger.config) for c in grid)
        candidates = [c for c in explicit if c.fits(held)]
        if not candidates:
            return None
        started = time.perf_counter()
        selection = self.merger.select(self.evaluate, candidates)
        self.evaluations += 1
        best, best_loss = selection.rows[0]
        schedule = self.merger.schedule
        improved = self.best is None or best_loss < self.best["loss"]
        if improved:
            self.best = {
                **best.to_dict(),
                "merge": str(best),
                "loss": best_loss,
                "step": schedule.steps_seen,
                "tokens": schedule.tokens_seen,
                "evaluation": self.evaluations,
            }
            if self.config.best_dir is not None:
                self.merger.export(self.config.best_dir, method=best, **self.config.export_options)
        record = {
            "evaluation": self.evaluations,
            "step": schedule.steps_seen,
            "tokens": schedule.tokens_seen,
            "snapshots_held": held,
            "live_loss": selection.baseline,
            "merges": [self._row(c, loss) for c, loss in selection.rows],
            "best": self._row(best, best_loss),
            "best_so_far": self.best,
            "exported": bool(improved and self.config.best_dir is not None),
            "seconds": time.perf_counter() - started,
        }
        self._log.write(record)
        return selection

    def _row(self, candidate: MergeSpec, loss: float) -> dict[str, Any]:
        used = self.merger.selection(spec=candidate)
        spacing = [b[1] - a[1] for a, b in zip(used, used[1:])]
        return {
            "merge": str(candidate),
            **candidate.to_dict(),
            "loss": loss,
            "n": len(used),
            "mean_spacing_tokens": sum(spacing) / len(spacing) if spacing else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "evaluations": self.evaluations,
            "best": self.best,
            "evaluated_at": self.evaluated_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluations = int(state["evaluations"])
        self.best = state["best"]
        self.evaluated_at = int(state["evaluated_at"])
        self._log.keep_first(self.evaluations)

    def close(self) -> None:
        """Stop saving with the Merger and close the log."""
        self.merger.remove_extension(EXTENSION_NAME)
        self._log.close()

    @property
    def log_path(self) -> Path | None:
        """The JSON-lines file of evaluation records (on the rank that writes it)."""
        return self._log.path
