"""Hugging Face safetensors layout: planned up front, written as tensors stream in.

The plan uses the ecosystem's own pieces: transformers decides which tied weights are dropped
(``remove_tied_weights_from_state_dict``) and which names the original checkpoint format uses
(``revert_weight_conversion``, e.g. Mixtral's grouped experts back to ``experts.{i}.w1``), and
huggingface_hub splits the tensors into files (``split_torch_state_dict_into_shards``). Planning
runs on meta tensors, so every rank knows every file name and its contents before any byte moves.

Writing streams: each output file belongs to one rank (round robin); a rank keeps only the
tensors of its own files, writes a file as soon as its last tensor arrives, and so holds at most
one file being filled plus the tensor in hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..files import fsync_path
from ..safetensors_io import write_safetensors
from .atomic import ExportError, describe_os_error
from .progress import progress_bar

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
Convert = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def is_transformers_model(model: nn.Module | None) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def converter(model: nn.Module | None, original_format: bool) -> Convert:
    """Map one source tensor to the output tensors of the checkpoint format.

    For transformers models with ``original_format`` this is the reverse of the conversion
    transformers applies when loading (so the files look like the architecture's hub
    checkpoints); otherwise names and tensors pass through.
    """
    if not (original_format and is_transformers_model(model)):
        return lambda name, tensor: {name: tensor}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 keeps the hub layout in memory: nothing to revert
        return lambda name, tensor: {name: tensor}
    return lambda name, tensor: revert_weight_conversion(model, {name: tensor})


def drop_tied(meta: dict[str, torch.Tensor], model: nn.Module | None) -> dict[str, torch.Tensor]:
    """Remove aliases of tied weights, keeping the name the model expects when loading."""
    if is_transformers_model(model):
        try:
            from transformers.modeling_utils import remove_tied_weights_from_state_dict
        except ImportError:
            remove_tied_weights_from_state_dict = None
        if remove_tied_weights_from_state_dict is not None:
            return remove_tied_weights_from_state_dict(dict(meta), model)
    if model is None:
        return dict(meta)
    seen, kept = set(), {}
    for name, tensor in meta.items():
        try:
            owner = id(model.get_parameter(name))
        except AttributeError:
            owner = name
        if owner not in seen:
            seen.add(owner)
            kept[name] = tensor
    return kept


@dataclass
class HFPlan:
    """Which source tensors are read, which output tensors they become, and which file each
    output tensor goes to."""

    sources: list[str]
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    file_of: dict[str, str]
    files: list[str]
    total_size: int
    dtype: torch.dtype | None
    expected_per_file: dict[str, int] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1

    def file_sizes(self) -> dict[str, int]:
        """Bytes of tensor data in each file."""
        sizes = dict.fromkeys(self.files, 0)
        for name, (shape, dtype) in self.outputs.items():
            sizes[self.file_of[name]] += math.prod(shape) * dtype.itemsize
        return sizes


def plan_hf(
    meta: dict[str, torch.Tensor],
    model: nn.Module | None,
    *,
    dtype: torch.dtype | None,
    max_shard_size: int | str,
    convert: Convert,
) -> HFPlan:
    """Plan the files for ``meta`` (name -> meta tensor of the full shape)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    kept = drop_tied(meta, model)
    outputs: dict[str, torch.Tensor] = {}
    for name, tensor in kept.items():
        for out_name, out in convert(name, tensor).items():
            if out_name in outputs:
                raise ExportError(f"two source tensors map to the output tensor {out_name!r}")
            outputs[out_name] = out.to(dtype) if dtype is not None else out
    split = split_torch_state_dict_into_shards(
        outputs,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    file_of = {name: f for f, names in split.filename_to_tensors.items() for name in names}
    return HFPlan(
        sources=list(kept),
        outputs={n: (tuple(t.shape), t.dtype) for n, t in outputs.items()},
        file_of=file_of,
        files=list(split.filename_to_tensors),
        total_size=split.metadata.get("total_size", sum(_nbytes(t) for t in outputs.values())),
        dtype=dtype,
        expected_per_file={f: len(names) for f, names in split.filename_to_tensors.items()},
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HFWriter:
    """Receives full source tensors in plan order and writes this rank's files as they fill.

    Errors while writing are kept, not raised, so that the rank keeps taking part in the
    collective walk over the tensors and every rank learns of the failure together.
    """

    def __init__(
        self, plan: HFPlan, directory: Path, rank: int, world: int, convert: Convert, progress: bool
    ) -> None:
        self.plan = plan
        self.directory = directory
        self.rank = rank
        self.mine = {f for i, f in enumerate(plan.files) if i % world == rank}
        self.convert = convert
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.seen: set[str] = set()
        self.written: dict[str, dict] = {}
        self.error: str | None = None
        self._bar = progress_bar(len(self.mine), f"rank {rank} writing", progress)
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pma-export-writer")
        self._flush = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pma-export-fsync")
        self._in_flight: Future | None = None
        self._flushed: list[Future] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            return
        try:
            for out_name, out in self.convert(name, tensor).items():
                self._take(out_name, out)
        except ExportError as err:
            self.error = str(err)

    def _take(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.plan.file_of:
            raise ExportError(f"tensor {name!r} is not in the export plan")
        if name in self.seen:
            raise ExportError(f"tensor {name!r} arrived twice")
        self.seen.add(name)
        file = self.plan.file_of[name]
        if file not in self.mine:
            return
        shape, dtype = self.plan.outputs[name]
        if tuple(tensor.shape) != shape:
            raise ExportError(f"tensor {name!r} has shape {tuple(tensor.shape)}, planned {shape}")
        if tensor.is_meta:
            raise ExportError(f"tensor {name!r} of this rank's file {file} was not delivered")
        self.pending.setdefault(file, {})[name] = _standalone(tensor, dtype)
        if len(self.pending[file]) == self.plan.expected_per_file[file]:
            self._write(file, self.pending.pop(file))

    def _write(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        """Hand a full file to the background writer, which writes and hashes it while the next
        tensors are gathered; at most one file is in flight (so a rank holds at most two files:
        that one and the one filling). Its fsync runs on a third thread while the next file is
        written, so that the disk does not wait for the writer at each file's end."""
        if self._in_flight is not None:
            self._in_flight.result()
        self._in_flight = self._disk.submit(self._write_now, file, tensors)
        self.written[file] = self._in_flight

    def _write_now(self, file: str, tensors: dict[str, torch.Tensor]) -> dict:
        path = self.directory / file
        try:
            entry = write_safetensors(path, tensors, {"format": "pt"}, sync=False)
        except OSError as err:
            raise describe_os_error(err, path) from err
        self._flushed.append(self._flush.submit(self._sync_now, path))
        return entry

    def _sync_now(self, path: Path) -> None:
        try:
            fsync_path(path)
        except OSError as err:
            raise describe_os_error(err, path) from err
        self._bar.update(1)

    def finish(self) -> dict[str, dict]:
        """Manifest entries of the files this rank wrote; records an error if any planned
        tensor never came."""
        self._disk.shutdown(wait=True)
        self._flush.shutdown(wait=True)
        self._bar.close()
        written = {}
        for file, future in self.written.items():
            try:
                written[file] = future.result()
            except ExportError as err:
                self.error = self.error or str(err)
        for future in self._flushed:
            try:
                future.result()
            except ExportError as err:
                self.error = self.error or str(err)
        self.written = written
        if self.error is None:
            missing = sorted(set(self.plan.outputs) - self.seen)
            if missing:
                self.error = f"{len(missing)} planned tensor(s) never arrived, e.g. {missing[:3]}"
            elif self.pending:
                self.error = f"files left incomplete: {sorted(self.pending)}"
        return self.written


def _standalone(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` on the CPU in ``dtype``, contiguous and sharing storage with nothing else
    (safetensors refuses aliases); copied only when it has to be."""
    alias = tensor._base is not None or tensor.storage_offset() != 0
    if (
        tensor.dtype == dtype
        and tensor.device.type == "cpu"
        and tensor.is_contiguous()
        and not alias
    ):
        return tensor
    out = torch.empty(tensor.shape, dtype=dtype)
    out.copy_(tensor)
    return out


def write_index(directory: Path, plan: HFPlan) -> None:
    """``model.safetensors.index.json`` for a sharded export."""
    if not plan.sharded:
        return
    index = {
        "metadata": {"total_size": plan.total_size},
        "weight_map": dict(sorted(plan.file_of.items())),
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_model_files(
    directory: Path,
    model: nn.Module | None,
    dtype: torch.dtype | None,
    config=None,
    tokenizer=None,
    generation_config=None,
) -> None:
    """config.json (with the export dtype), generation config and tokenizer files."""
    import copy

    if config is None and is_transformers_model(model):
        config = model.config
    if config is not None:
        config = copy.deepcopy(config)
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(directory)
    if generation_config is None and is_transformers_model(model) and model.can_generate():
        generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
