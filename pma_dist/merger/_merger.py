"""The public object: a thin facade over a schedule, an averaging state, a backend and the
non-finite policy. Merges are read out by ``_readouts`` and the state is checkpointed by
``_checkpointing``, both mixed into :class:`Merger`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..backends import Backend, Shard, select_backend, unwrap_optimizer
from ..config import PMAConfig
from ..core import SnapshotSchedule, state_for
from ..kernels import BLOCK
from ._checkpointing import Checkpointing
from ._nonfinite import NonFiniteGuard
from ._readouts import Readouts

RUNNING_VERDICTS_HELD = 10
"""Running snapshots whose agreed verdicts wait on the device before the host reads them (and
counts, skips or raises on them): the host syncs once per this many snapshots at most."""


class Merger(Readouts, Checkpointing):
    """Keeps the pre-trained model average of this rank's shard, online and in place.

    Call :meth:`step` after every optimizer step; it is a few integer operations unless a
    snapshot is due. A window snapshot copies the local shard into an fp32 slot in one pass
    over memory that also judges it finite, with no collective and no host sync; ranks agree
    on those verdicts when the slots are read and once a window (:meth:`agree`). A running
    snapshot is one lerp guarded on the device by the ranks' verdict (a scalar all-reduce; a
    NaN folded in could not be taken out), read by the host at the same agreements.
    Persistent floating buffers are averaged with the parameters (``pma.average_buffers``).

    The object is a DCP ``Stateful``: pass it in the state dict given to
    ``torch.distributed.checkpoint.save``/``load`` beside the model and optimizer. It installs
    one hook (an optimizer step pre-hook per torch optimizer that writes the shards, with
    offloaded slots); :meth:`close` removes it.
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
        self.config = PMAConfig.coerce(config, owner="Merger(model, optimizer, config)")
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
        like, runs = [s.local for s in shards], [s.runs for s in shards]
        self._state = state_for(self.config, like, runs, [delta_block(s) for s in shards])
        self._swap_active = False
        self._extensions = {}
        self._unclaimed = {}
        if hasattr(self.backend, "step_optimizers"):
            inners = self.backend.step_optimizers()
        else:
            inners = [o for o in [unwrap_optimizer(optimizer)] if o is not None]
        self._step_hooked = bool(inners)
        self._hooks = []
        if self.config.offload != "none":
            for inner in inners:
                hook = inner.register_step_pre_hook(lambda *_: self._state.wait_device())
                self._hooks.append(hook)

    @property
    def num_snapshots(self) -> int:
        """Snapshots folded into the average so far (those found non-finite not counted)."""
        return self._state.count

    @property
    def num_skipped(self) -> int:
        """Snapshots left out because some rank's shard held NaN/Inf, as of the last
        :meth:`agree` in window mode."""
        return self._guard.num_skipped

    @property
    def skip_streak(self) -> int:
        """Non-finite snapshots in a row (reset by a good one); see ``max_consecutive_skips``."""
        return self._guard.streak

    @property
    def state_bytes(self) -> int:
        """Bytes of averaging state this rank holds (every slot, padding included)."""
        return self._state.nbytes

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
        """Take a snapshot now, whatever the schedule (True). One found non-finite on some rank
        is left out, and counted, at the next :meth:`agree`: within a window of snapshots
        (running mode: :data:`RUNNING_VERDICTS_HELD`). Running mode makes one scalar
        all-reduce per snapshot (no host sync); both modes agree once a window."""
        if self._swap_active:
            raise RuntimeError("Merger.snapshot() inside swapped(): the live weights are merged")
        shards = [s.local for s in self.backend.shards()]
        steps, tokens = self.schedule.steps_seen, self.schedule.tokens_seen
        seq = self._state.next_seq
        if self._state.mode == "window":
            verdict = self._state.snapshot(shards, steps, tokens, check=self._guard.checking)
            held = self._state.window
        else:
            verdict = self._guard.judge(self._state.real(shards))
            self._state.snapshot(shards, steps, tokens, verdict)
            held = RUNNING_VERDICTS_HELD
        self._guard.hold(seq, verdict)
        if len(self._guard.pending) >= held:
            self.agree()
        if not self._step_hooked:
            self._state.wait_copied()
        return True

    def agree(self) -> None:
        """Make every rank agree on which window snapshots since the last agreement were finite
        everywhere; leave out the others (raising per ``on_nonfinite``/``max_consecutive_skips``).
        Merges, swaps, exports and saves call it first. Collective when snapshots are pending."""
        self._guard.agree(self._state, self.backend)

    def drop_snapshots(self, since_step: int) -> list[tuple[int, int]]:
        """Leave every snapshot taken at ``since_step`` or later out of all later merges (a
        trajectory abandoned by a loss-spike rollback); later snapshots take their slots first.
        Window mode only. The dropped ``(step, tokens)``, oldest first."""
        if self._state.mode != "window":
            raise ValueError("drop_snapshots needs window mode (pma.window = N)")
        return [(r.step, r.tokens) for r in self._state.drop_since(since_step)]

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


def delta_block(shard: Shard) -> int:
    """Elements per fp8 block along the rows of ``shard`` (``pma.compression = "fp8"``): 128,
    or 1 where a checkpoint could reshard a row across ranks (the layout splits the last
    dimension, or the tensor has one dimension, which is its row), so that a DCP checkpoint
    lays the scales out like the parameter. Decided from the layout, not the local shape,
    so every rank decides alike (an empty shard too)."""
    if shard.checkpoint_view is None:
        return BLOCK
    return 1 if len(shard.global_shape) < 2 or shard.rows_split else BLOCK
