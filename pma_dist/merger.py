"""The public object: a schedule, an averaging state and a backend glued together."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import deque
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

log = logging.getLogger("pma_dist")

STATE_FORMAT = 1
"""Version of the layout returned by :meth:`Merger.state_dict`."""


class Merger:
    """Keeps the pre-trained model average of this rank's shard, online and in place.

    Call :meth:`step` after every optimizer step; it is a few integer operations unless a
    snapshot is due. A snapshot copies (window mode) or lerps (running mode) the local shard
    into fp32 slots with fused multi-tensor ops, with no communication beyond one scalar
    all-reduce that makes every rank agree on skipping a non-finite snapshot.

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
        self.backend = backend if backend is not None else select_backend(model, optimizer)
        self.schedule = SnapshotSchedule.from_config(self.config)
        self._model = model
        self._group = process_group
        hooked = _step_hook_target(optimizer)
        self._step_hooked = hooked is not None
        self._pending_tokens: int | None = None
        shards = self.backend.shards()
        self.names = [s.name for s in shards]
        """Names of the averaged tensors, in state order."""
        self.global_shapes = [list(s.global_shape) for s in shards]
        self._state = self._build_state([s.local for s in shards])
        self.num_skipped = 0
        """Snapshots left out because some rank's shard held NaN/Inf."""
        self.history: deque[tuple[int, int]] = deque(maxlen=self.config.window or 1)
        """``(step, tokens)`` at each snapshot in the window, oldest first."""
        self._swap_active = False
        if hooked is not None and self.config.offload != "none":
            hooked.register_step_pre_hook(lambda *_: self._state.wait_device())

    def _build_state(self, like: list[torch.Tensor]) -> AveragingState:
        config = self.config
        dtype = getattr(torch, config.dtype)
        wider = sorted({str(t.dtype) for t in like if t.element_size() > dtype.itemsize})
        if wider:
            warnings.warn(
                f"pma.dtype = {config.dtype!r} is lower precision than parameters of dtype "
                f"{', '.join(wider)}; averages lose precision",
                stacklevel=3,
            )
        if config.running:
            return RunningAverage(
                like, config.method, config.ema_alpha, dtype=dtype, offload=config.offload
            )
        return WindowAverage(like, config.window, dtype=dtype, offload=config.offload)

    @property
    def num_snapshots(self) -> int:
        """Snapshots folded into the average so far (skipped ones not counted)."""
        return self._state.count

    @property
    def window_size(self) -> int:
        """Snapshots the merged model is currently made of (at most ``config.window``)."""
        return len(self._state.logical_slots())

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
            all_finite(shards), self._group
        ):
            where = f"step {self.schedule.steps_seen}, {self.schedule.tokens_seen} tokens"
            if self.config.on_nonfinite == "raise":
                raise NonFiniteSnapshotError(
                    f"PMA snapshot at {where} holds NaN/Inf on at least one rank "
                    "(pma.on_nonfinite = 'raise')"
                )
            self.num_skipped += 1
            log.warning("PMA snapshot at %s skipped: NaN/Inf on at least one rank", where)
            return False
        self._state.snapshot(shards)
        if not self._step_hooked:
            self._state.wait_host()
        self.history.append((self.schedule.steps_seen, self.schedule.tokens_seen))
        return True

    @contextmanager
    def swapped(
        self, method: str | None = None, weights: Sequence[float] | None = None
    ) -> Iterator[Merger]:
        """Put the merged weights into the live parameters for the body; restore them bitwise.

        The originals come back also when the body raises. ``method`` picks a weighting in
        window mode (``"sma"``, ``"wma"``, ``"ema"``); ``weights`` gives one weight per
        snapshot in the window, oldest first (normalized to sum to one). Enter it on every
        rank: under DeepSpeed, pushing the master to the working weights is collective, and an
        FSDP2 forward inside the body is too.
        """
        if self._swap_active:
            raise RuntimeError("Merger.swapped() is already active; swaps do not nest")
        resolved = self._weights(method, weights)
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

    def apply(self, method: str | None = None, weights: Sequence[float] | None = None) -> None:
        """Overwrite the live parameters with the merged weights (PMA-init, recovery).

        The optimizer state is left as it is; the averaging state too, so later snapshots
        continue the same window.
        """
        if self._swap_active:
            raise RuntimeError("Merger.apply() inside swapped(): leave the swap first")
        resolved = self._weights(method, weights)
        shards = self._local_tensors()
        self._state.wait_device()
        self._write(lambda: self._state.merge_into(shards, resolved))

    def merged_shards(
        self, method: str | None = None, weights: Sequence[float] | None = None
    ) -> dict[str, torch.Tensor]:
        """The merged local shards as new tensors in the accumulation dtype, keyed by name."""
        resolved = self._weights(method, weights)
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
        **options: Any,
    ) -> Path:
        """Write the merged model to ``path`` (``"hf"`` safetensors or ``"dcp"``). Collective.

        Streams one tensor at a time and replaces ``path`` only once the new export is whole;
        see :func:`pma_dist.export.export_model` for ``options`` (config, tokenizer,
        max_shard_size, ...). The live weights are restored bitwise afterwards.
        """
        from .export import export_model

        info = {
            "pma": {
                "method": "weights" if weights is not None else method or self.config.method,
                "mode": self._state.mode,
                "num_snapshots": self.num_snapshots,
                "window_size": self.window_size,
                "history": [list(h) for h in self.history],
            }
        }
        with self.swapped(method, weights):
            return export_model(self._model, path, format=format, dtype=dtype, info=info, **options)

    def _weights(self, method: str | None, weights: Sequence[float] | None) -> list[float]:
        if method is not None and weights is not None:
            raise ValueError("pass method= or weights=, not both")
        if method is not None and method not in METHODS:
            raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")
        if self.num_snapshots == 0:
            raise RuntimeError(
                "no PMA snapshot has been taken yet: nothing to merge (the first one is due at "
                f"{self.schedule.next_due} {self.schedule.unit})"
            )
        if self.config.running:
            if weights is not None or method not in (None, self.config.method):
                raise ValueError(
                    f"running mode (pma.window = null) keeps a single {self.config.method!r} "
                    f"average; method={method!r}/weights need window mode (pma.window = N)"
                )
            return [1.0]
        n = self.window_size
        if weights is not None:
            return normalized_weights(weights, n)
        return window_weights(method or self.config.method, n, self.config.ema_alpha)

    def _local_tensors(self) -> list[torch.Tensor]:
        return [s.local for s in self.backend.shards()]

    def _write(self, fill) -> None:
        self.backend.begin_write()
        with torch.no_grad():
            fill()
        self.backend.end_write()

    def state_dict(self) -> dict[str, Any]:
        """The averaging state: slots as DTensors (or tensors) that DCP saves sharded."""
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
        return {
            "count": self._state.count,
            "head": getattr(self._state, "head", 0),
            "num_skipped": self.num_skipped,
            "schedule": self.schedule.state_dict(),
            "history": [list(h) for h in self.history],
        }

    def _set_counters(self, state: Mapping[str, Any]) -> None:
        self._state.count = int(state["count"])
        if isinstance(self._state, WindowAverage):
            self._state.head = int(state["head"])
        self.num_skipped = int(state["num_skipped"])
        self.schedule.load_state_dict(dict(state["schedule"]))
        self.history.clear()
        self.history.extend(tuple(h) for h in state["history"])

    def _meta(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "mode": self._state.mode,
            "window": self.config.window,
            "running_method": self.config.method if self.config.running else None,
            "config": self.config.to_dict(),
            "names": list(self.names),
            "shapes": [list(s) for s in self.global_shapes],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; validated in full before anything changes."""
        self._check_compatible(state)
        try:
            sources = [
                [_local(state["slots"][str(k)][name]) for name in self.names]
                for k in range(len(self._state.slots))
            ]
        except KeyError as missing:
            raise PMAStateError(f"PMA state is incomplete: no slot entry {missing}") from None
        for k, (slot, srcs) in enumerate(zip(self._state.slots, sources)):
            for i, (dst, src) in enumerate(zip(slot, srcs)):
                if tuple(src.shape) != tuple(dst.shape):
                    raise PMAStateError(
                        f"PMA state slot {k}, {self.names[i]!r}: local shape {tuple(src.shape)}, "
                        f"this rank expects {tuple(dst.shape)}"
                    )
        self._state.wait_host()
        with torch.no_grad():
            for slot, srcs in zip(self._state.slots, sources):
                for dst, src in zip(slot, srcs):
                    if src.data_ptr() != dst.data_ptr() or src.numel() == 0:
                        dst.copy_(src)
        self._set_counters(state)

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

        files, copies = self._plan_load(Path(directory))
        self._state.wait_host()
        with torch.no_grad():
            for k, slot in enumerate(self._state.slots):
                apply_copies(files, copies, k, slot)
        self._set_counters(files[0]["counters"])

    def check_replicas(self) -> None:
        """Raise ``PMAStateError`` on every rank unless all ranks agree on the snapshot counts
        and every group of ranks that holds the same parameter elements (DDP or HSDP replicas)
        holds bit-identical averaging state. Collective; costs one read of the slots."""
        shards = self.backend.shards()
        layout = repr([(f.param, f.start, f.numel) for s in shards for f in s.fragments])
        self._state.wait_host()
        sums = [bit_checksum(t) for slot in self._state.slots for t in slot]
        mine = (
            hashlib.sha1(layout.encode()).hexdigest(),
            sums,
            (self.num_snapshots, self.num_skipped),
        )
        everyone = comm.gather_objects(mine, group=self._group)
        counts = {c for _, _, c in everyone}
        if len(counts) > 1:
            raise PMAStateError(f"ranks disagree on (snapshots, skipped): {sorted(counts)}")
        by_layout: dict[str, list] = {}
        for rank, (signature, sums, _) in enumerate(everyone):
            by_layout.setdefault(signature, []).append((rank, sums))
        for members in by_layout.values():
            first_rank, first = members[0]
            for rank, sums in members[1:]:
                if sums != first:
                    raise PMAStateError(
                        f"replicas differ: ranks {first_rank} and {rank} hold the same parameter "
                        "elements but different averaging state"
                    )

    def check_saved(self, directory: str | Path) -> None:
        """Raise ``PMAStateError`` unless :meth:`load` would succeed; changes nothing."""
        self._plan_load(Path(directory))

    def _plan_load(self, directory: Path):
        from .state_files import plan_copies, read_rank_files

        files = read_rank_files(directory)
        self._compare_settings(files[0]["meta"], self._portable_meta())
        return files, plan_copies(files, self.backend.shards())

    def _portable_meta(self) -> dict[str, Any]:
        meta = self._meta()
        return {k: meta[k] for k in ("format", "mode", "window", "running_method", "config")}

    def _compare_settings(self, saved: Mapping[str, Any], ours: Mapping[str, Any]) -> None:
        if saved.get("format") != STATE_FORMAT:
            raise PMAStateError(
                f"PMA state format {saved.get('format')!r}, expected {STATE_FORMAT}"
            )
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

    def _check_compatible(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in ("meta", "count", "head", "slots", "schedule") if k not in state]
        if missing:
            raise PMAStateError(f"PMA state lacks {missing}: not a Merger.state_dict()")
        saved, ours = state["meta"], self._meta()
        self._compare_settings(saved, ours)
        if (
            list(saved["names"]) != ours["names"]
            or [list(s) for s in saved["shapes"]] != ours["shapes"]
        ):
            pairs = zip(zip(saved["names"], saved["shapes"]), zip(ours["names"], ours["shapes"]))
            first = next(((a, b) for a, b in pairs if list(a[1]) != b[1] or a[0] != b[0]), None)
            raise PMAStateError(
                f"PMA state is for another model: {len(saved['names'])} tensors saved, "
                f"{len(ours['names'])} here; first difference (saved, here): {first}"
            )
        if int(state["count"]) < 0:
            raise PMAStateError(f"PMA state count = {state['count']!r}: must be >= 0")


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
