"""Tensors of a model read back from a checkpoint, one at a time, in one process.

Three kinds of checkpoint are understood: a pma_dist DCP export (the model's tensors under their
own names); a training checkpoint that holds a Merger's state under ``pma_key`` beside the
model under ``model_key``; and a directory of per-rank state files (``Merger.save``, the
DeepSpeed integration's checkpoint tag directories), which must then hold every tensor of the
model. From the last two the merge is computed here exactly as the Merger would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..backends import module_state
from ..core import MergeSpec, merge_terms, resolve_weights
from ..errors import PMAStateError
from ..kernels import BLOCK, decode_deltas, delta_segments, merge_decoded
from ..state import SavedTensors, StateHeader, has_index, read_entries, unflatten
from ._atomic import ExportError
from ._sources import read_dcp_tensor


def _load_config(config: Any):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    path = Path(config)
    return AutoConfig.from_pretrained(path.parent if path.is_file() else path)


class OfflineSource:
    """A meta model of the architecture named by ``config`` and the checkpoint's tensors."""

    def __init__(
        self,
        source: Path,
        config: Any,
        *,
        method: str | None,
        pma_key: str,
        model_key: str,
        last: int | None = None,
        stride: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.source = source
        self.config = _load_config(config)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config)
        self.names = module_state(self.model)
        self.pma_key, self.model_key = pma_key, model_key
        self.order: list[int] = []
        self.weights: list[float] = []
        self.method = None
        self.averaged: set[str] = set()
        self.saved: SavedTensors | None = None
        self.pma_tensors: dict[str, Any] = {}
        self.all_tensors: dict[str, Any] = {}
        try:
            if has_index(source):
                self.saved = SavedTensors(source)
                self._check_complete()
                self._plan_merge(self.saved.header, method, last, stride)
                return
            values, self.pma_tensors = read_entries(source, f"{pma_key}.")
            _, self.all_tensors = read_entries(source, "")
            if self.pma_tensors:
                header = StateHeader.from_flat(unflatten(values), str(self.source))
                self._plan_merge(header, method, last, stride)
        except PMAStateError as err:
            raise ExportError(str(err)) from None

    def _check_complete(self) -> None:
        """Every tensor of the model is saved, a tied one under any of its names."""
        ties: dict[int, list[str]] = {}
        for name, tensor in self.names.items():
            ties.setdefault(id(tensor), []).append(name)
        self._saved_as = {
            name: next((n for n in ties[id(t)] if n in self.saved.shapes), None)
            for name, t in self.names.items()
        }
        missing = [name for name, saved in self._saved_as.items() if saved is None]
        if missing:
            named = ", ".join(map(repr, missing[:3])) + (" ..." if len(missing) > 3 else "")
            raise ExportError(
                f"{self.source}: the per-rank PMA state holds no {named} ({len(missing)} of the "
                f"model's {len(self.names)} tensors): an export from it needs every tensor "
                "averaged (buffers too: pma.average_buffers); export from a DCP checkpoint of "
                "the model and the Merger instead"
            )

    def _plan_merge(
        self, header: StateHeader, method: str | None, last: int | None, stride: int | None
    ) -> None:
        self.order = header.merge_order()
        self.compression = header.compression
        if not self.order:
            raise ExportError(f"{self.source}: the PMA state holds no valid snapshot")
        self.averaged = set(header.names or ()) | set(self._saved_as if self.saved else ())
        saved = header.config
        running = header.mode == "running"
        if running and (method not in (None, header.running_method) or last or stride):
            raise ExportError(
                f"{self.source}: running-mode state averages with {header.running_method!r}; "
                f"method={method!r}, last, stride need a window-mode state"
            )
        spec = MergeSpec(method, last, stride).resolved(
            saved["method"], saved.get("last"), saved.get("stride", 1)
        )
        self.method = spec.method
        if running:
            self.weights = [1.0]
            return
        weights = resolve_weights(len(self.order), spec, saved["ema_alpha"])
        self.terms = merge_terms(header.records, weights)
        used = [(slot, w) for slot, w in zip(self.order, weights) if w != 0]
        self.order, self.weights = [slot for slot, _ in used], [w for _, w in used]

    def describe(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.source),
            "method": self.method,
            "snapshots_merged": len(self.order),
        }

    def _key(self, name: str) -> str:
        for key in (name, f"{self.model_key}.{name}"):
            if key in self.all_tensors:
                return key
        raise ExportError(f"{self.source}: no tensor {name!r} (nor {self.model_key}.{name!r})")

    def _averaged(self, name: str) -> bool:
        return name in self.averaged

    def meta(self) -> dict[str, torch.Tensor]:
        """Meta tensors with the checkpoint's dtype for each of the model's tensors."""
        out = {}
        for name, tensor in self.names.items():
            if self.saved is not None:
                shape, dtype = self.saved.shapes[self._saved_as[name]], self.saved.dtype
            elif self._averaged(name):
                first = "slots.0" if self.compression == "none" else "base"
                shape, dtype = self.pma_tensors[f"{first}.{name}"]
            else:
                shape, dtype = self.all_tensors[self._key(name)]
            if tuple(shape) != tuple(tensor.shape):
                raise ExportError(
                    f"{self.source}: {name!r} has shape {tuple(shape)} in the checkpoint, "
                    f"{tuple(tensor.shape)} in the architecture of the given config"
                )
            out[name] = torch.empty(shape, dtype=dtype, device="meta")
        return out

    def tensors(self, names: list[str], writers=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, read in this process (offline conversion has one writer)."""
        for name in names:
            if self._averaged(name):
                yield name, self._merge(name)
            else:
                key = self._key(name)
                yield name, read_dcp_tensor(self.source, key, *self.all_tensors[key])

    def _slots(self, name: str) -> Iterator[torch.Tensor]:
        if self.saved is not None:
            yield from self.saved.read(self._saved_as[name], self.order)
            return
        for slot in self.order:
            fqn = f"{self.pma_key}.slots.{slot}.{name}"
            yield read_dcp_tensor(self.source, fqn, *self.all_tensors[fqn])

    def _merge(self, name: str) -> torch.Tensor:
        """The weighted sum of the saved slots, in the order and precision the Merger uses."""
        if self.compression != "none":
            return self._merge_compressed(name)
        acc = None
        for value, weight in zip(self._slots(name), self.weights):
            if acc is None:
                acc = value.mul_(weight)
            else:
                acc.add_(value, alpha=weight)
        return acc

    def _merge_compressed(self, name: str) -> torch.Tensor:
        """W * base - sum_k P_k * delta_k with the Merger's roundings."""
        total, terms = self.terms
        keys = ["base", *(f"deltas.{k}" for k, _ in terms)]
        if self.saved is not None:
            base, *deltas = self.saved.read(self._saved_as[name], keys)
        else:
            base, *deltas = [self._dcp_plane(key, name) for key in keys]
        return merge_decoded(base, total, [(d.float(), c) for d, (_, c) in zip(deltas, terms)])

    def _dcp_plane(self, key: str, name: str) -> torch.Tensor:
        """A stored plane of a DCP checkpoint, whole; fp8 differences decoded with their
        scales, whose blocks lie along the parameter's rows (or one per element)."""
        fqn = f"{self.pma_key}.{key}.{name}"
        value = read_dcp_tensor(self.source, fqn, *self.pma_tensors[f"{key}.{name}"])
        if self.compression != "fp8" or not key.startswith("deltas."):
            return value
        scales_key = f"scales.{key.split('.', 1)[1]}.{name}"
        scales = read_dcp_tensor(
            self.source, f"{self.pma_key}.{scales_key}", *self.pma_tensors[scales_key]
        )
        block = 1 if tuple(scales.shape) == tuple(value.shape) else BLOCK
        return decode_deltas("fp8", value, scales, delta_segments(value.shape, None, block))
