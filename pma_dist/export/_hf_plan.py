"""Hugging Face safetensors layout, planned up front: which tensors, under which names, in which
files; and the files beside the weights (index, config, tokenizer).

The plan uses the ecosystem's own pieces: transformers decides which tied weights are dropped
(``remove_tied_weights_from_state_dict``) and which names the original checkpoint format uses
(``revert_weight_conversion``, e.g. Mixtral's grouped experts back to ``experts.{i}.w1``), and
huggingface_hub splits the tensors into files (``split_torch_state_dict_into_shards``). Planning
runs on meta tensors, so every rank knows every file name and its contents before any byte moves.

The weights are written as they stream in by ``_hf_writer``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._atomic import ExportError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
Convert = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class HFOptions:
    """How an HF directory is written."""

    dtype: torch.dtype | None
    """Cast of floating tensors (None: as they are)."""
    max_shard_size: int | str
    """Largest safetensors file."""
    original_format: bool
    """Write the architecture's hub names (per-expert MoE weights) rather than in-memory ones."""
    progress: bool
    """Show a progress bar on the writing ranks."""
    convert: Convert | None = None
    """Source tensor to output tensors, in place of the architecture's conversion."""


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
    source_names: bool = True,
) -> HFPlan:
    """Plan the files for ``meta`` (name -> meta tensor of the full shape); aliases of tied
    weights are dropped where ``meta`` has the architecture's names (``source_names``: not
    under a conversion of another model's tensors)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    kept = drop_tied(meta, model) if source_names else dict(meta)
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
