"""Which held snapshots a merge uses and how it weighs them, as one value.

Every way of reading a merge out (swap, apply, merged shards, export, the weights alone,
selection, the merge monitor, offline export) takes the same four choices; :class:`MergeSpec`
carries them together from the caller to :func:`~pma_dist.core.resolve_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class MergeSpec:
    """One merge of the held snapshots: a method over the newest ``last`` taken every
    ``stride``-th (N = last, V = stride x interval, all from one ring), or explicit weights.

    Unset parts take the configuration's default merge (:meth:`resolved`), so
    ``MergeSpec("wma")`` is the config's N and V weighed by WMA.
    """

    method: str | None = None
    """Weighting: ``"sma"``, ``"wma"``, ``"ema"``, ``"linear"``, ``"cosine"`` or
    ``"minus_sqrt"``; None: the config's ``method``."""
    last: int | None = None
    """N: the newest ``last`` valid snapshots; None: as many as fit at ``stride``."""
    stride: int | None = None
    """Every ``stride``-th snapshot, so the merge's V is ``stride`` intervals; None: 1."""
    weights: Sequence[float] | None = None
    """One weight per held snapshot, oldest first (normalized), in place of a method, ``last``
    and ``stride``."""

    def __post_init__(self) -> None:
        if self.weights is not None:
            if self.method is not None:
                raise ValueError("pass method= or weights=, not both")
            object.__setattr__(self, "weights", tuple(self.weights))

    @property
    def uses_default_snapshots(self) -> bool:
        """Whether it names neither N, V nor weights, so the config's ``last``/``stride`` apply."""
        return self.weights is None and self.last is None and self.stride is None

    def resolved(self, method: str, last: int | None = None, stride: int = 1) -> MergeSpec:
        """This merge with its unset parts from a default merge (a config's ``method``,
        ``last``, ``stride``): the default method when it names neither a method nor weights,
        the default N and V when it names none of N, V and weights."""
        spec = self
        if not self.method and self.weights is None:
            spec = replace(spec, method=method)
        if self.uses_default_snapshots:
            spec = replace(spec, last=last, stride=stride if stride > 1 else None)
        return spec

    def fits(self, held: int) -> bool:
        """Whether ``held`` valid snapshots span this merge."""
        if self.weights is not None:
            return len(self.weights) == held
        return held >= 1 and ((self.last or 1) - 1) * (self.stride or 1) + 1 <= held

    def to_dict(self) -> dict[str, Any]:
        """Its fields as plain values (``weights`` only when set), for logs and saved state."""
        out: dict[str, Any] = {"method": self.method, "last": self.last, "stride": self.stride}
        if self.weights is not None:
            out["weights"] = list(self.weights)
        return out

    def __str__(self) -> str:
        if self.weights is not None:
            return f"weights {[round(float(w), 4) for w in self.weights]}"
        n = self.last if self.last is not None else "all"
        return f"{self.method or 'default'} N={n} stride={self.stride or 1}"
