"""When a snapshot is due: token or step intervals on a fixed grid. Pure Python, no tensors.

Snapshots fall on the grid ``start + k * interval`` (k >= 1) of the interval's unit. A step that
crosses a grid point makes a snapshot due and the next point is the first grid point after the
current count, so spacing stays V tokens on average however the batch size changes, and a
step larger than V takes one snapshot rather than a burst.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any

from ..config import PMAConfig


@dataclass
class SnapshotSchedule:
    """Counts optimizer steps and tokens and says when a snapshot is due."""

    interval: int
    """Grid spacing, in ``unit``."""
    unit: str
    """``"tokens"`` or ``"steps"``."""
    start_tokens: int = 0
    """No snapshot before this many tokens."""
    start_step: int = 0
    """No snapshot before this many steps."""
    tokens_per_step: int | None = None
    """Tokens of a step called without ``tokens=``; ``None`` means tokens must be passed."""
    steps_seen: int = 0
    """Optimizer steps recorded so far."""
    tokens_seen: int = 0
    """Global tokens recorded so far."""
    next_due: int = 0
    """Next grid point, in ``unit``; set from the start and interval when 0."""

    def __post_init__(self) -> None:
        if self.next_due == 0:
            self.next_due = self._start + self.interval

    @classmethod
    def from_config(cls, config: PMAConfig) -> SnapshotSchedule:
        """The schedule that ``config`` describes, at step 0."""
        interval = config.interval_tokens or config.interval_steps
        assert interval is not None  # guaranteed by PMAConfig.validate
        return cls(
            interval=interval,
            unit=config.interval_unit,
            start_tokens=config.start_tokens,
            start_step=config.start_step,
            tokens_per_step=config.tokens_per_step,
        )

    @property
    def _start(self) -> int:
        return self.start_tokens if self.unit == "tokens" else self.start_step

    @property
    def _clock(self) -> int:
        return self.tokens_seen if self.unit == "tokens" else self.steps_seen

    def advance(self, tokens: Any = None) -> bool:
        """Record one optimizer step of ``tokens`` global tokens; True when a snapshot is due."""
        count = self._token_count(tokens)
        self.steps_seen += 1
        if count is not None:
            self.tokens_seen += count
        clock = self._clock
        if clock < self.next_due:
            return False
        self.next_due = self._start + self.interval * ((clock - self._start) // self.interval + 1)
        return self.steps_seen >= self.start_step and self.tokens_seen >= self.start_tokens

    def _token_count(self, tokens: Any) -> int | None:
        if tokens is None:
            if self.tokens_per_step is not None:
                return self.tokens_per_step
            if self.unit == "tokens" or self.start_tokens:
                raise ValueError(
                    "Merger.step(tokens=None): this schedule counts tokens "
                    f"(interval in {self.unit}, start_tokens={self.start_tokens}); pass "
                    "tokens=<global tokens of this optimizer step> or set pma.tokens_per_step"
                )
            return None
        try:
            count = operator.index(tokens)
        except TypeError:
            raise TypeError(
                f"Merger.step(tokens={tokens!r}): tokens must be a non-negative integer "
                f"(global tokens of this optimizer step), got {type(tokens).__name__}"
            ) from None
        if count < 0:
            raise ValueError(
                f"Merger.step(tokens={count}): tokens must be a non-negative integer "
                "(global tokens of this optimizer step)"
            )
        return count

    def state_dict(self) -> dict[str, Any]:
        """Counters and settings, for checkpoints."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the counters; the interval and start come from the current config."""
        self.steps_seen = int(state["steps_seen"])
        self.tokens_seen = int(state["tokens_seen"])
        if state["unit"] == self.unit and state["interval"] == self.interval:
            self.next_due = int(state["next_due"])
        else:
            k = max((self._clock - self._start) // self.interval + 1, 1)
            self.next_due = self._start + self.interval * k


def lacks_token_source(config: PMAConfig, counted: bool) -> bool:
    """True when ``config``'s schedule needs each step's global token count (a token interval
    or start) and neither the trainer (``counted``) nor ``pma.tokens_per_step`` gives it: what
    every trainer integration refuses before training rather than count local batches."""
    needs_tokens = config.interval_unit == "tokens" or config.start_tokens > 0
    return needs_tokens and not counted and config.tokens_per_step is None
