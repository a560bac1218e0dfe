"""The public object: a thin facade over a schedule, an averaging state, a backend, the
non-finite policy, the swap protocol, persistence and the replica audit."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import audit, persistence, swap
from .averaging import WindowAverage, state_for
from .backends import Backend, select_backend
from .config import PMAConfig
from .nonfinite import NonFiniteGuard
from .optimizers import unwrap_optimizer
from .schedule import SnapshotSchedule
from .state_format import StateHeader

Weights = Sequence[float] | None
"""One weight per held snapshot, oldest first (normalized), or None for a method's weights."""


class Merger:
    """Keeps the pre-trained model average of this rank's shard, online and in place.

    Call :meth:`step` after every optimizer step; it is a few integer operations unless a
    snapshot is due. A snapshot copies (window mode) or lerps (running mode) the local shard
    into fp32 slots with fused multi-tensor ops, with no communication beyond one scalar
    all-reduce that makes every rank agree on skipping a non-finite snapshot. Persistent
    floating buffers are averaged with the parameters (``pma.average_buffers``).

    The object is a DCP ``Stateful``: pass it in the state dict given to
    ``torch.distributed.checkpoint.save``/``load`` beside the model and optimizer. It installs
    one hook (an optimizer step pre-hook, with offloaded slots); :meth:`close` removes it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        config: PMAConfig | Mapping[str, Any] | None = None,
        *,
        backend: Backend | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if config is None:
            raise ValueError(
                "Merger(model, optimizer, config): config is required, e.g. "
                "PMAConfig(method='sma', window=10, interval_tokens=4_000_000_000)"
            )
        self.config = config if isinstance(config, PMAConfig) else PMAConfig.from_dict(config)
        buffers = self.config.average_buffers
        self.backend = backend or select_backend(model, optimizer, buffers=buffers)
        self.schedule = SnapshotSchedule.from_config(self.config)
        self.process_group = process_group
        """The ranks this Merger's collectives run over (None: the default group)."""
        self._model = model
        self._guard = NonFiniteGuard(self.config, process_group)
        self._pending_tokens: int | None = None
        shards = self.backend.shards()
        self.names = [s.name for s in shards]
        """Names of the averaged tensors (parameters, then buffers), in state order."""
        self.buffer_names = [s.name for s in shards if s.buffer]
        """The names that are module buffers."""
        self.global_shapes = [list(s.global_shape) for s in shards]
        self._state = state_for(self.config, [s.local for s in shards], [s.runs for s in shards])
        self._swap_active = False
        inner = unwrap_optimizer(optimizer)
        self._step_hooked = inner is not None
        self._hooks = []
        if inner is not None and self.config.offload != "none":
            self._hooks.append(inner.register_step_pre_hook(lambda *_: self._state.wait_device()))

    @property
    def num_snapshots(self) -> int:
        """Snapshots folded into the average so far (skipped ones not counted)."""
        return self._state.count

    @property
    def num_skipped(self) -> int:
        """Snapshots left out because some rank's shard held NaN/Inf."""
        return self._guard.num_skipped

    @property
    def skip_streak(self) -> int:
        """Non-finite snapshots in a row (reset by a good one); see ``max_consecutive_skips``."""
        return self._guard.streak

    @property
    def window_size(self) -> int:
        """Snapshots the merged model is currently made of (at most ``config.window``)."""
        return len(self._state.logical_slots())

    @property
    def history(self) -> list[tuple[int, int]]:
        """``(step, tokens)`` of each snapshot a merge uses, oldest first."""
        return [(r.step, r.tokens) for r in self._state.merged_records()]

    def step(self, tokens: Any = None) -> bool:
        """Record one optimizer step; take a snapshot when one is due. True if one was taken.

        ``tokens`` is the number of tokens this step consumed over all data-parallel ranks (the
        same value on every rank); when omitted, the sum of :meth:`add_tokens` since the last
        step, else ``config.tokens_per_step``. Collective when a snapshot is due.
        """
        if tokens is None and self._pending_tokens is not None:
            tokens = self._pending_tokens
        self._pending_tokens = None
        return self.schedule.advance(tokens) and self.snapshot()

    def add_tokens(self, tokens: int) -> None:
        """Count ``tokens`` (global, this micro-batch) towards the next :meth:`step`, for loops
        where the step is taken elsewhere (DeepSpeed engines, gradient accumulation)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"add_tokens({tokens!r}): tokens must be a non-negative integer")
        self._pending_tokens = (self._pending_tokens or 0) + tokens

    def snapshot(self) -> bool:
        """Take a snapshot now, whatever the schedule. Collective. False if it was skipped."""
        if self._swap_active:
            raise RuntimeError("Merger.snapshot() inside swapped(): the live weights are merged")
        shards = [s.local for s in self.backend.shards()]
        steps, tokens = self.schedule.steps_seen, self.schedule.tokens_seen
        if not self._guard.admit(
            self._state.real(shards), self.backend, f"step {steps}, {tokens} tokens"
        ):
            return False
        self._state.snapshot(shards, steps, tokens)
        if not self._step_hooked:
            self._state.wait_host()
        return True

    def drop_snapshots(self, since_step: int) -> list[tuple[int, int]]:
        """Leave every snapshot taken at ``since_step`` or later out of all later merges (a
        trajectory abandoned by a loss-spike rollback); later snapshots take their slots first.
        Window mode only. The dropped ``(step, tokens)``, oldest first."""
        if not isinstance(self._state, WindowAverage):
            raise ValueError("drop_snapshots needs window mode (pma.window = N)")
        return [(r.step, r.tokens) for r in self._state.drop_since(since_step)]

    @contextmanager
    def swapped(
        self, method: str | None = None, weights: Weights = None, *, last: int | None = None
    ) -> Iterator[Merger]:
        """Put the merged weights into the live parameters for the body; restore them bitwise.

        ``method`` picks a weighting in window mode (``"sma"``, ``"wma"``, ``"ema"``);
        ``weights`` gives one weight per snapshot held, oldest first (normalized); ``last=k``
        merges the newest k only. Enter it on every rank: under DeepSpeed pushing the master
        to the working weights is collective, and an FSDP2 forward inside the body is too.
        """
        if self._swap_active:
            raise RuntimeError("Merger.swapped() is already active; swaps do not nest")
        resolved = self._weights(method, weights, last)
        self._swap_active = True
        try:
            with swap.swapped_in(self.backend, self._state, resolved, self.config.offload):
                yield self
        finally:
            self._swap_active = False

    def apply(
        self, method: str | None = None, weights: Weights = None, *, last: int | None = None
    ) -> None:
        """Overwrite the live parameters (and averaged buffers) with the merge (PMA-init,
        recovery), as in :meth:`swapped`; the optimizer and averaging state are kept."""
        if self._swap_active:
            raise RuntimeError("Merger.apply() inside swapped(): leave the swap first")
        swap.apply_merge(self.backend, self._state, self._weights(method, weights, last))

    def merged_shards(
        self, method: str | None = None, weights: Weights = None, *, last: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The merged local shards as new tensors in the accumulation dtype, keyed by name."""
        resolved = self._weights(method, weights, last)
        shards = [s.local for s in self.backend.shards()]
        out = [torch.empty(t.shape, dtype=self._state.dtype, device=t.device) for t in shards]
        self._state.merge_into(out, resolved)
        return dict(zip(self.names, out))

    def export(
        self,
        path: str | Path,
        format: str = "hf",
        method: str | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        weights: Weights = None,
        last: int | None = None,
        **options: Any,
    ) -> Path:
        """Write the merged model to ``path`` (``"hf"`` safetensors or ``"dcp"``). Collective.

        Streams one tensor at a time and replaces ``path`` only once the new export is whole;
        see :func:`pma_dist.export.export_model` for ``options`` (config, tokenizer,
        max_shard_size, ...). The live weights are restored bitwise afterwards.
        """
        from .export import export_model

        merged = self.history[-last:] if last else self.history
        info = {
            "method": "weights" if weights is not None else method or self.config.method,
            **{"mode": self._state.mode, "num_snapshots": self.num_snapshots},
            **{"window_size": len(merged), "history": [list(h) for h in merged]},
        }
        with self.swapped(method, weights, last=last):
            return export_model(
                self._model,
                path,
                format=format,
                dtype=dtype,
                info={"pma": info},
                source=self.backend.source() if hasattr(self.backend, "source") else None,
                group=self.process_group,
                **options,
            )

    def _weights(self, method: str | None, weights: Weights, last: int | None) -> list[float]:
        if method is not None and weights is not None:
            raise ValueError("pass method= or weights=, not both")
        if self.num_snapshots == 0:
            raise RuntimeError(
                "no PMA snapshot has been taken yet: nothing to merge (the first one is due at "
                f"{self.schedule.next_due} {self.schedule.unit})"
            )
        return self._state.weights(
            method or self.config.method, self.config.ema_alpha, weights, last
        )

    def header(self) -> StateHeader:
        """What a save of this state holds beside the slots."""
        tensors = (self.names, self.global_shapes, self.buffer_names)
        counts = {"num_skipped": self.num_skipped, "skip_streak": self.skip_streak}
        schedule = self.schedule.state_dict()
        return StateHeader.describe(self.config, self._state, *tensors, schedule=schedule, **counts)

    def _restore(self, saved: StateHeader) -> None:
        """Counters from a checked header; buffers from live values if it saved none."""
        self._state.restore(saved.count, saved.records)
        self._guard.num_skipped, self._guard.streak = saved.num_skipped, saved.skip_streak
        self.schedule.load_state_dict(saved.schedule)
        if saved.format == 1:
            persistence.buffers_from_live(self.backend, self._state)

    def state_dict(self) -> dict[str, Any]:
        """The averaging state (format 2, :mod:`pma_dist.state_format`) for DCP: slots laid out
        like their parameters, buffers as replicated tensors."""
        return persistence.dcp_state(self.backend, self._state, self.header())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; validated in full before anything changes.
        A format-1 state loads too (its buffers start from the live values, with a warning);
        DCP reads one only with ``planner=DefaultLoadPlanner(allow_partial_load=True)``."""
        self._restore(persistence.load_dcp_state(state, self._state, self.header()))

    def save(self, directory: str | Path) -> Path:
        """Write the averaging state as one file per rank under ``directory``. Collective. The
        files describe slots as runs of parameter elements: :meth:`load` reshards them."""
        return persistence.save_files(
            Path(directory), self.backend, self._state, self.header(), self.process_group
        )

    def load(self, directory: str | Path) -> None:
        """Resume from :meth:`save` output written under any layout; checked in full (settings,
        parameter names and shapes, every element covered) before anything changes."""
        plan = persistence.plan_files(Path(directory), self.backend, self.header())
        plan.apply(self._state)
        self._restore(plan.header)

    def check_saved(self, directory: str | Path) -> None:
        """Raise ``PMAStateError`` unless :meth:`load` would succeed; changes nothing."""
        persistence.plan_files(Path(directory), self.backend, self.header())

    def check_replicas(self) -> None:
        """Raise ``PMAStateError`` on every rank unless all ranks agree on the counts and every
        replica (DDP/HSDP, buffers) holds bit-identical state. Collective."""
        counts = (self.num_snapshots, self.num_skipped)
        audit.check_replicas(self.backend, self._state, counts, self.process_group)

    def close(self) -> None:
        """Remove every hook this Merger installed; the averaging state stays readable."""
        self._state.wait_host()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._step_hooked = False

    def __enter__(self) -> Merger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
