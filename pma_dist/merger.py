"""The public object: a schedule, an averaging state and a backend glued together."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import comm
from .averaging import (
    AveragingState,
    RunningAverage,
    WindowAverage,
    all_finite,
    normalized_weights,
    window_weights,
)
from .backends import Backend, select_backend
from .config import METHODS, PMAConfig
from .errors import NonFiniteSnapshotError, PMAStateError
from .offload import empty_slot, slot_device
from .schedule import SnapshotSchedule
from .state_files import bit_checksum
from .state_format import FORMAT_VERSION, check_version, counters_v2, derived_counters

log = logging.getLogger("pma_dist")


class Merger:
    """Keeps the pre-trained model average of this rank's shard, online and in place.

    Call :meth:`step` after every optimizer step; it is a few integer operations unless a
    snapshot is due. A snapshot copies (window mode) or lerps (running mode) the local shard
    into fp32 slots with fused multi-tensor ops, with no communication beyond one scalar
    all-reduce that makes every rank agree on skipping a non-finite snapshot. Persistent
    floating buffers are averaged with the parameters (``pma.average_buffers``).

    The object is a DCP ``Stateful``: pass it in the state dict given to
    ``torch.distributed.checkpoint.save``/``load`` beside the model and optimizer.
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
        self.backend = (
            backend
            if backend is not None
            else select_backend(model, optimizer, buffers=self.config.average_buffers)
        )
        self.schedule = SnapshotSchedule.from_config(self.config)
        self._model = model
        self._group = process_group
        hooked = _step_hook_target(optimizer)
        self._step_hooked = hooked is not None
        self._pending_tokens: int | None = None
        shards = self.backend.shards()
        self.names = [s.name for s in shards]
        """Names of the averaged tensors (parameters, then buffers), in state order."""
        self.buffer_names = [s.name for s in shards if s.buffer]
        """The names that are module buffers."""
        self.global_shapes = [list(s.global_shape) for s in shards]
        self._state = self._build_state([s.local for s in shards], [s.runs for s in shards])
        self.num_skipped = 0
        """Snapshots left out because some rank's shard held NaN/Inf."""
        self.skip_streak = 0
        """Non-finite snapshots in a row (reset by a good one); see ``max_consecutive_skips``."""
        self._swap_active = False
        self._step_hook = None
        if hooked is not None and self.config.offload != "none":
            self._step_hook = hooked.register_step_pre_hook(lambda *_: self._state.wait_device())

    def _build_state(self, like: list[torch.Tensor], runs: list) -> AveragingState:
        config = self.config
        dtype = getattr(torch, config.dtype)
        wider = sorted({str(t.dtype) for t in like if t.element_size() > dtype.itemsize})
        if wider:
            warnings.warn(
                f"pma.dtype = {config.dtype!r} is lower precision than parameters of dtype "
                f"{', '.join(wider)}; averages lose precision",
                stacklevel=3,
            )
        options = {"dtype": dtype, "offload": config.offload, "runs": runs}
        if config.running:
            return RunningAverage(like, config.method, config.ema_alpha, **options)
        return WindowAverage(like, config.window, **options)

    @property
    def num_snapshots(self) -> int:
        """Snapshots folded into the average so far (skipped ones not counted)."""
        return self._state.count

    @property
    def window_size(self) -> int:
        """Snapshots the merged model is currently made of (at most ``config.window``)."""
        return len(self._state.logical_slots())

    @property
    def history(self) -> list[tuple[int, int]]:
        """``(step, tokens)`` of each snapshot a merge uses, oldest first (in running mode, the
        latest one folded in)."""
        return [(r.step, r.tokens) for r in self._state.merged_records()]

    def drop_snapshots(self, since_step: int) -> list[tuple[int, int]]:
        """Leave every snapshot taken at ``since_step`` or later out of all later merges, e.g.
        a trajectory abandoned by a loss-spike rollback; later snapshots reuse their slots
        first. Window mode only. Returns the dropped ``(step, tokens)``, oldest first."""
        if not isinstance(self._state, WindowAverage):
            raise ValueError(
                "drop_snapshots needs window mode (pma.window = N): a running average cannot "
                "take snapshots back out"
            )
        order = self._state.logical_slots()
        dropped = [k for k in order if self._state.records[k].step >= since_step]
        records = [(self._state.records[k].step, self._state.records[k].tokens) for k in dropped]
        self._state.drop(dropped)
        return records

    def step(self, tokens: Any = None) -> bool:
        """Record one optimizer step; take a snapshot when one is due. True if one was taken.

        ``tokens`` is the number of tokens this step consumed over all data-parallel ranks (the
        same value on every rank); when omitted, the sum of :meth:`add_tokens` since the last
        step, else ``config.tokens_per_step``. Collective when a snapshot is due, so call it on
        every rank.
        """
        if tokens is None and self._pending_tokens is not None:
            tokens = self._pending_tokens
        self._pending_tokens = None
        if not self.schedule.advance(tokens):
            return False
        return self.snapshot()

    def add_tokens(self, tokens: int) -> None:
        """Count ``tokens`` (global, this micro-batch) towards the next :meth:`step`.

        For loops where the step is taken elsewhere (DeepSpeed engines, gradient accumulation):
        call it per micro-batch; the next ``step()`` without ``tokens=`` uses the sum.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"add_tokens({tokens!r}): tokens must be a non-negative integer")
        self._pending_tokens = (self._pending_tokens or 0) + tokens

    def snapshot(self) -> bool:
        """Take a snapshot now, whatever the schedule. Collective. False if it was skipped."""
        if self._swap_active:
            raise RuntimeError("Merger.snapshot() inside swapped(): the live weights are merged")
        shards = self._local_tensors()
        if self.config.on_nonfinite != "ignore" and not comm.all_true(
            all_finite(self._state.real(shards)), self._group
        ):
            return self._skip()
        self._state.snapshot(shards, self.schedule.steps_seen, self.schedule.tokens_seen)
        self.skip_streak = 0
        if not self._step_hooked:
            self._state.wait_host()
        return True

    def _skip(self) -> bool:
        """Leave a non-finite snapshot out, or raise when the policy or the streak says so.
        Every rank gets here together (the check is agreed), so naming the culprits is a
        collective that only failing runs pay for."""
        where = f"step {self.schedule.steps_seen}, {self.schedule.tokens_seen} tokens"
        limit = self.config.max_consecutive_skips
        if self.config.on_nonfinite == "raise":
            reason = "pma.on_nonfinite = 'raise'"
        elif limit is not None and self.skip_streak + 1 >= limit:
            reason = (
                f"{self.skip_streak + 1} snapshots in a row were non-finite, "
                f"pma.max_consecutive_skips = {limit}: the run has no usable average"
            )
        else:
            self.num_skipped += 1
            self.skip_streak += 1
            log.warning("PMA snapshot at %s skipped: NaN/Inf on at least one rank", where)
            return False
        culprits = comm.gather_objects(self._nonfinite_names(), group=self._group)
        named = "; ".join(
            f"rank {rank}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for rank, names in enumerate(culprits)
            if names
        )
        raise NonFiniteSnapshotError(f"PMA snapshot at {where} holds NaN/Inf ({reason}); {named}")

    def _nonfinite_names(self) -> list[str]:
        """Names of this rank's tensors with a NaN/Inf among their real elements."""
        names = []
        with torch.no_grad():
            for shard in self.backend.shards():
                flat = shard.local.view(-1)
                for f in shard.fragments:
                    part = flat[f.local_start : f.local_start + f.numel]
                    if f.param not in names and not bool(torch.isfinite(part).all()):
                        names.append(f.param)
        return names

    @contextmanager
    def swapped(
        self,
        method: str | None = None,
        weights: Sequence[float] | None = None,
        *,
        last: int | None = None,
    ) -> Iterator[Merger]:
        """Put the merged weights into the live parameters for the body; restore them bitwise.

        The originals come back also when the body raises. ``method`` picks a weighting in
        window mode (``"sma"``, ``"wma"``, ``"ema"``); ``weights`` gives one weight per
        snapshot in the window, oldest first (normalized to sum to one); ``last=k`` merges the
        newest k snapshots only. Enter it on every rank: under DeepSpeed, pushing the master to
        the working weights is collective, and an FSDP2 forward inside the body is too.
        """
        if self._swap_active:
            raise RuntimeError("Merger.swapped() is already active; swaps do not nest")
        resolved = self._weights(method, weights, last)
        shards = self._local_tensors()
        self._state.wait_device()
        backup = [
            empty_slot(t, t.dtype, slot_device(t.device, self.config.offload)) for t in shards
        ]
        for dst, src in zip(backup, shards):
            dst.copy_(src)
        self._swap_active = True
        try:
            self._write(lambda: self._state.merge_into(shards, resolved))
            yield self
        finally:
            self._write(lambda: _copy_all(shards, backup))
            self._swap_active = False

    def apply(
        self,
        method: str | None = None,
        weights: Sequence[float] | None = None,
        *,
        last: int | None = None,
    ) -> None:
        """Overwrite the live parameters (and averaged buffers) with the merge (PMA-init,
        recovery); arguments as in :meth:`swapped`.

        The optimizer state is left as it is; the averaging state too, so later snapshots
        continue the same window.
        """
        if self._swap_active:
            raise RuntimeError("Merger.apply() inside swapped(): leave the swap first")
        resolved = self._weights(method, weights, last)
        shards = self._local_tensors()
        self._state.wait_device()
        self._write(lambda: self._state.merge_into(shards, resolved))

    def merged_shards(
        self,
        method: str | None = None,
        weights: Sequence[float] | None = None,
        *,
        last: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The merged local shards as new tensors in the accumulation dtype, keyed by name."""
        resolved = self._weights(method, weights, last)
        shards = self._local_tensors()
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
        weights: Sequence[float] | None = None,
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
            "pma": {
                "method": "weights" if weights is not None else method or self.config.method,
                "mode": self._state.mode,
                "num_snapshots": self.num_snapshots,
                "window_size": len(merged),
                "history": [list(h) for h in merged],
            }
        }
        with self.swapped(method, weights, last=last):
            return export_model(self._model, path, format=format, dtype=dtype, info=info, **options)

    def _weights(
        self, method: str | None, weights: Sequence[float] | None, last: int | None = None
    ) -> list[float]:
        """One weight per merged snapshot (oldest first), from a method, explicit weights, or a
        method over the newest ``last`` snapshots (older ones weigh zero and are not read)."""
        if method is not None and weights is not None:
            raise ValueError("pass method= or weights=, not both")
        if last is not None and weights is not None:
            raise ValueError("pass last= or weights=, not both (give zero weights instead)")
        if method is not None and method not in METHODS:
            raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")
        if self.num_snapshots == 0:
            raise RuntimeError(
                "no PMA snapshot has been taken yet: nothing to merge (the first one is due at "
                f"{self.schedule.next_due} {self.schedule.unit})"
            )
        if self.config.running:
            if weights is not None or last is not None or method not in (None, self.config.method):
                raise ValueError(
                    f"running mode (pma.window = null) keeps a single {self.config.method!r} "
                    f"average; method={method!r}/weights/last need window mode (pma.window = N)"
                )
            return [1.0]
        n = self.window_size
        if weights is not None:
            return normalized_weights(weights, n)
        k = n if last is None else last
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"last={last!r}: must be an integer in [1, {n}] (snapshots held)")
        chosen = window_weights(method or self.config.method, k, self.config.ema_alpha)
        return [0.0] * (n - k) + chosen

    def _local_tensors(self) -> list[torch.Tensor]:
        return [s.local for s in self.backend.shards()]

    def _write(self, fill) -> None:
        self.backend.begin_write()
        with torch.no_grad():
            fill()
        self.backend.end_write()

    def state_dict(self) -> dict[str, Any]:
        """The averaging state (format 2, see :mod:`pma_dist.state_format`): slots as DTensors
        (or tensors) that DCP saves sharded, buffers as replicated tensors."""
        self._state.wait_host()
        shards = self.backend.shards()
        slots = {
            str(k): {
                s.name: s.checkpoint_view(buf) for s, buf in zip(shards, slot) if s.checkpoint_view
            }
            for k, slot in enumerate(self._state.slots)
        }
        if any(s.checkpoint_view is None for s in shards):
            raise TypeError(
                f"{type(self.backend).__name__} shards have no DCP form; save the averaging "
                "state with Merger.save(directory) (or the engine's save_checkpoint)"
            )
        return {"meta": self._meta(), **self._counters(), "slots": slots}

    def _counters(self) -> dict[str, Any]:
        next_slot = self._state.next_slot() if isinstance(self._state, WindowAverage) else 0
        return {
            **self._state.state_dict(),
            "num_skipped": self.num_skipped,
            "skip_streak": self.skip_streak,
            "schedule": self.schedule.state_dict(),
            **derived_counters(self._state.records, next_slot),
        }

    def _set_counters(self, counters: Mapping[str, Any]) -> None:
        """Install counters already checked by :func:`~pma_dist.state_format.counters_v2`."""
        self._state.load_state_dict(
            {
                "count": counters["count"],
                "records": [r.to_list() if r else None for r in counters["records"]],
            }
        )
        self.num_skipped = counters["num_skipped"]
        self.skip_streak = counters["skip_streak"]
        self.schedule.load_state_dict(counters["schedule"])

    def _meta(self) -> dict[str, Any]:
        return {
            **self._portable_meta(),
            "names": list(self.names),
            "shapes": [list(s) for s in self.global_shapes],
        }

    def _portable_meta(self) -> dict[str, Any]:
        """What the state means, whatever the layout: checked against this Merger on load."""
        return {
            "format": FORMAT_VERSION,
            "mode": self._state.mode,
            "window": self.config.window,
            "running_method": self.config.method if self.config.running else None,
            "config": self.config.to_dict(),
            "buffers": list(self.buffer_names),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; validated in full before anything changes.

        A format-1 state (no slot records, no buffers) loads too; its buffers start from the
        live values, with a warning. DCP reads it only with
        ``planner=DefaultLoadPlanner(allow_partial_load=True)``, as the keys format 2 added
        are not in it.
        """
        version, counters = self._check_compatible(state)
        names = [n for n in self.names if version > 1 or n not in self.buffer_names]
        try:
            sources = [
                [_local(state["slots"][str(k)][name]) for name in names]
                for k in range(len(self._state.slots))
            ]
        except KeyError as missing:
            raise PMAStateError(f"PMA state is incomplete: no slot entry {missing}") from None
        slots = [[slot[self.names.index(n)] for n in names] for slot in self._state.slots]
        for k, (slot, srcs) in enumerate(zip(slots, sources)):
            for name, dst, src in zip(names, slot, srcs):
                if tuple(src.shape) != tuple(dst.shape):
                    raise PMAStateError(
                        f"PMA state slot {k}, {name!r}: local shape {tuple(src.shape)}, "
                        f"this rank expects {tuple(dst.shape)}"
                    )
        self._state.wait_host()
        with torch.no_grad():
            for slot, srcs in zip(slots, sources):
                for dst, src in zip(slot, srcs):
                    if src.data_ptr() != dst.data_ptr() or src.numel() == 0:
                        dst.copy_(src)
        self._set_counters(counters)
        if version == 1:
            self._buffers_from_live()

    def _buffers_from_live(self) -> None:
        """Fill every filled slot's buffers with the live buffers (state saved without them)."""
        if not self.buffer_names:
            return
        warnings.warn(
            f"PMA state format 1 holds no buffers: {', '.join(self.buffer_names[:5])} start "
            "from their live values in every snapshot of the window",
            stacklevel=3,
        )
        live = {s.name: s.local for s in self.backend.shards() if s.buffer}
        with torch.no_grad():
            for slot, record in zip(self._state.slots, self._state.records):
                if record is not None:
                    for name in self.buffer_names:
                        slot[self.names.index(name)].copy_(live[name])

    def save(self, directory: str | Path) -> Path:
        """Write the averaging state as one file per rank under ``directory``. Collective.

        The files describe each slot as runs of parameter elements, so :meth:`load` reshards
        them to any world size or layout (DeepSpeed ZeRO stages, FSDP2, whole tensors).
        """
        from .state_files import write_rank_file

        directory = Path(directory)
        if comm.rank(self._group) == 0:
            directory.mkdir(parents=True, exist_ok=True)
        comm.broadcast_object(None, group=self._group)
        self._state.wait_host()
        header = {"meta": self._portable_meta(), "counters": self._counters()}
        write_rank_file(
            directory,
            comm.rank(self._group),
            comm.world_size(self._group),
            header,
            self.backend.shards(),
            self._state.slots,
        )
        comm.gather_objects(None, group=self._group)
        return directory

    def load(self, directory: str | Path) -> None:
        """Resume from :meth:`save` output written under any layout; checked in full (settings,
        parameter names and shapes, every element covered) before anything changes."""
        from .state_files import apply_copies

        files, copies, version, counters = self._plan_load(Path(directory))
        self._state.wait_host()
        with torch.no_grad():
            for k, slot in enumerate(self._state.slots):
                apply_copies(files, copies, k, slot)
        self._set_counters(counters)
        if version == 1:
            self._buffers_from_live()

    def check_replicas(self) -> None:
        """Raise ``PMAStateError`` on every rank unless all ranks agree on the snapshot counts
        and every tensor that several ranks hold the same elements of (DDP or HSDP replicas,
        buffers) holds bit-identical averaging state on each. Collective; costs one read of
        the slots, whose padding is always zero."""
        self._state.wait_host()
        mine: dict[str, list[int]] = {}
        for i, shard in enumerate(self.backend.shards()):
            layout = repr([(f.param, f.start, f.numel) for f in shard.fragments])
            key = hashlib.sha1(layout.encode()).hexdigest()
            mine[key] = [bit_checksum(slot[i]) for slot in self._state.slots]
        counts = (self.num_snapshots, self.num_skipped, repr(self._state.state_dict()))
        everyone = comm.gather_objects((counts, mine), group=self._group)
        if len({c for c, _ in everyone}) > 1:
            raise PMAStateError(
                "ranks disagree on (snapshots, skipped, slot records): "
                f"{sorted({c for c, _ in everyone})}"
            )
        first: dict[str, tuple[int, list[int]]] = {}
        for rank, (_, sums) in enumerate(everyone):
            for key, values in sums.items():
                holder, expected = first.setdefault(key, (rank, values))
                if values != expected:
                    raise PMAStateError(
                        f"replicas differ: ranks {holder} and {rank} hold the same elements "
                        "but different averaging state"
                    )

    def check_saved(self, directory: str | Path) -> None:
        """Raise ``PMAStateError`` unless :meth:`load` would succeed; changes nothing."""
        self._plan_load(Path(directory))

    def _plan_load(self, directory: Path):
        from .state_files import plan_copies, read_rank_files

        files = read_rank_files(directory)
        saved = files[0]["meta"]
        version = self._compare_settings(saved, str(directory))
        counters = counters_v2(files[0]["counters"], version, len(self._state.slots))
        skip = {i for i, n in enumerate(self.names) if n in self.buffer_names and version == 1}
        return files, plan_copies(files, self.backend.shards(), skip=skip), version, counters

    def _compare_settings(self, saved: Mapping[str, Any], where: str) -> int:
        """The saved format version, once the settings that shape the state match ours."""
        version = check_version(saved.get("format"), where)
        ours = self._portable_meta()
        for key, what in (
            ("mode", "averaging mode"),
            ("window", "pma.window"),
            ("running_method", "running-mode pma.method"),
        ):
            if saved.get(key) != ours[key]:
                raise PMAStateError(
                    f"PMA state was saved with {what} = {saved.get(key)!r}, this Merger has "
                    f"{ours[key]!r}; restart averaging or use the saved setting"
                )
        return version

    def _check_compatible(self, state: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        missing = [k for k in ("meta", "count", "slots", "schedule") if k not in state]
        if missing:
            raise PMAStateError(f"PMA state lacks {missing}: not a Merger.state_dict()")
        saved = state["meta"]
        version = self._compare_settings(saved, "Merger.load_state_dict")
        counters = counters_v2(state, version, len(self._state.slots))
        ours = self._meta()
        names = [n for n in ours["names"] if version > 1 or n not in self.buffer_names]
        shapes = [s for n, s in zip(ours["names"], ours["shapes"]) if n in names]
        if list(saved["names"]) != names or [list(s) for s in saved["shapes"]] != shapes:
            pairs = zip(zip(saved["names"], saved["shapes"]), zip(names, shapes))
            first = next(((a, b) for a, b in pairs if list(a[1]) != b[1] or a[0] != b[0]), None)
            raise PMAStateError(
                f"PMA state is for another model (or pma.average_buffers differs): "
                f"{len(saved['names'])} tensors saved, {len(names)} here; first difference "
                f"(saved, here): {first}"
            )
        return version, counters


def _local(tensor: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local()
    if not isinstance(tensor, torch.Tensor):
        raise PMAStateError(f"PMA state slot holds {type(tensor).__name__}, expected a tensor")
    return tensor


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)


def _step_hook_target(optimizer: Any) -> torch.optim.Optimizer | None:
    """The innermost torch optimizer, whose ``step`` writes the averaged tensors, for a pre-hook
    that orders it after pending snapshot copies. Wrappers (DeepSpeed's ZeRO and bf16
    optimizers, Accelerate's ``AcceleratedOptimizer``) keep it as ``.optimizer``; their own
    ``step`` does not run torch's step hooks."""
    target = None
    for _ in range(4):
        if optimizer is None:
            break
        if hasattr(optimizer, "register_step_pre_hook"):
            target = optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return target
