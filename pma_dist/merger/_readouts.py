"""Reading merges out of a :class:`~pma_dist.Merger`: swapped into the live model, applied to
it, as local tensors, or exported; each resolves its weights against the agreed snapshots.

A mixin, so that the public object keeps one flat API while each concept lives in its own
module; it reads the Merger's parts and never reaches past them. Every readout takes the merge
as keyword arguments or as one :class:`~pma_dist.MergeSpec` in place of ``method``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..backends import Backend
from ..config import PMAConfig
from ..core import AveragingState, MergeSpec, SnapshotSchedule
from . import _swap as swap
from ._selection import Selection, select

Weights = Sequence[float] | None
"""One weight per held snapshot, oldest first (normalized), or None for a method's weights."""
Method = str | MergeSpec | None
"""A weighting by name, a whole :class:`~pma_dist.MergeSpec`, or None for the config's."""


class Readouts:
    """Swap, apply, merged shards and export of the merged weights."""

    config: PMAConfig
    backend: Backend
    schedule: SnapshotSchedule
    process_group: dist.ProcessGroup | None
    names: list[str]
    _model: nn.Module
    _state: AveragingState
    _swap_active: bool
    num_snapshots: int
    history: list[tuple[int, int]]

    def agree(self) -> None:
        raise NotImplementedError

    @contextmanager
    def swapped(
        self,
        method: Method = None,
        weights: Weights = None,
        *,
        last: int | None = None,
        stride: int | None = None,
    ) -> Iterator[Readouts]:
        """Put the merged weights into the live parameters for the body; restore them bitwise.

        ``method`` picks a weighting in window mode (``"sma"``, ``"wma"``, ``"ema"``, or a
        decay-shaped ``"linear"``, ``"cosine"``, ``"minus_sqrt"``); ``weights`` gives one weight
        per snapshot held, oldest first (normalized); ``last=k`` merges the newest k only and
        ``stride=s`` every s-th of them (N = k, V = s x interval, from the same ring; see
        :meth:`selection`); without ``weights``, ``last`` and ``stride``, the config's
        ``last``/``stride``. A :class:`~pma_dist.MergeSpec` in place of ``method`` says all of
        it at once. Enter it on every rank: under DeepSpeed pushing the master to the working
        weights is collective, and an FSDP2 forward inside the body is too.
        """
        if self._swap_active:
            raise RuntimeError("Merger.swapped() is already active; swaps do not nest")
        resolved = self._weights(_spec(method, weights, last, stride))
        self._swap_active = True
        try:
            with swap.swapped_in(self.backend, self._state, resolved, self.config.offload):
                yield self
        finally:
            self._swap_active = False

    def apply(
        self,
        method: Method = None,
        weights: Weights = None,
        *,
        last: int | None = None,
        stride: int | None = None,
    ) -> None:
        """Overwrite the live parameters (and averaged buffers) with the merge (PMA-init,
        recovery), as in :meth:`swapped`; the optimizer and averaging state are kept."""
        if self._swap_active:
            raise RuntimeError("Merger.apply() inside swapped(): leave the swap first")
        resolved = self._weights(_spec(method, weights, last, stride))
        swap.apply_merge(self.backend, self._state, resolved)

    def weights_for(
        self,
        method: Method = None,
        weights: Weights = None,
        *,
        last: int | None = None,
        stride: int | None = None,
    ) -> list[float]:
        """The weight of each held snapshot (oldest first, see :attr:`history`) in the merge
        these arguments ask for. Collective when snapshots are pending."""
        return self._weights(_spec(method, weights, last, stride))

    def select(
        self,
        evaluate: Callable[[], Any],
        candidates: Sequence[MergeSpec] | None = None,
        **then: Any,
    ) -> Selection:
        """Rank candidate merges (default: methods x N x stride from the ring) by the loss
        ``evaluate()`` returns with each swapped in, averaged over ranks, against the live
        model; ``apply_best=True`` or ``export_best=path`` act on the winner. Collective:
        every rank calls it. See :func:`pma_dist.merger.select`."""
        return select(self, evaluate, candidates, **then)

    def selection(
        self, last: int | None = None, stride: int | None = None, *, spec: MergeSpec | None = None
    ) -> list[tuple[int, int]]:
        """``(step, tokens)`` of the snapshots a merge with ``last``/``stride`` (or the whole
        ``spec``) uses, oldest first: their recorded spacing is the real V (skips and token-grid
        jumps make it differ from ``stride`` x interval). Collective when snapshots are
        pending."""
        resolved = self._weights(spec if spec is not None else MergeSpec(last=last, stride=stride))
        return [h for h, w in zip(self.history, resolved) if w != 0]

    def merged_shards(
        self,
        method: Method = None,
        weights: Weights = None,
        *,
        last: int | None = None,
        stride: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The merged local shards as new tensors in the accumulation dtype, keyed by name.
        Collective when snapshots are pending (:meth:`agree`)."""
        resolved = self._weights(_spec(method, weights, last, stride))
        shards = [s.local for s in self.backend.shards()]
        out = [torch.empty(t.shape, dtype=self._state.dtype, device=t.device) for t in shards]
        self._state.merge_into(out, resolved)
        return dict(zip(self.names, out))

    def export(
        self,
        path: str | Path,
        format: str = "hf",
        method: Method = None,
        dtype: torch.dtype | str | None = None,
        *,
        weights: Weights = None,
        last: int | None = None,
        stride: int | None = None,
        **options: Any,
    ) -> Path:
        """Write the merged model to ``path`` (``"hf"`` safetensors or ``"dcp"``). Collective.

        Streams one tensor at a time and replaces ``path`` only once the new export is whole;
        see :func:`pma_dist.export.export_model` for ``options`` (config, tokenizer,
        max_shard_size, ...). The live weights are restored bitwise afterwards.
        """
        from ..export import export_model  # the writers load when a model is exported

        spec = _spec(method, weights, last, stride)
        info = self.describe_merge(spec)
        with self.swapped(spec):
            return export_model(
                self._model,
                path,
                format=format,
                dtype=dtype,
                info={"pma": info},
                source=self.backend.source() if hasattr(self.backend, "source") else None,
                group=self.process_group,
                **{"convert": _hf_convert(self.backend, format), **options},
            )

    def describe_merge(
        self,
        method: Method = None,
        weights: Weights = None,
        *,
        last: int | None = None,
        stride: int | None = None,
    ) -> dict[str, Any]:
        """What a merge these arguments ask for is made of, as exports record it: its method,
        the snapshots it weighs (``(step, tokens)``) and their spacing in tokens. Collective
        when snapshots are pending."""
        spec = _spec(method, weights, last, stride)
        merged = [h for h, w in zip(self.history, self._weights(spec)) if w != 0]
        return {
            "method": "weights" if spec.weights is not None else spec.method or self.config.method,
            **{"mode": self._state.mode, "num_snapshots": self.num_snapshots},
            **{"window_size": len(merged), "history": [list(h) for h in merged]},
            "spacing_tokens": [b[1] - a[1] for a, b in zip(merged, merged[1:])],
        }

    def _weights(self, spec: MergeSpec) -> list[float]:
        self.agree()
        if self.num_snapshots == 0:
            raise RuntimeError(
                "no PMA snapshot has been taken yet: nothing to merge (the first one is due at "
                f"{self.schedule.next_due} {self.schedule.unit})"
            )
        config = self.config
        resolved = spec.resolved(config.method, config.last, config.stride)
        return self._state.weights(resolved, config.ema_alpha)


def _hf_convert(backend, format: str):
    """The backend's map of its tensors to a Hugging Face architecture's, if it has one."""
    return backend.hf_convert() if format == "hf" and hasattr(backend, "hf_convert") else None


def _spec(method: Method, weights: Weights, last: int | None, stride: int | None) -> MergeSpec:
    """The merge the readout arguments ask for, as one value."""
    if isinstance(method, MergeSpec):
        if weights is not None or last is not None or stride is not None:
            raise ValueError(f"pass a MergeSpec ({method}) or weights=/last=/stride=, not both")
        return method
    return MergeSpec(method, last, stride, weights)
