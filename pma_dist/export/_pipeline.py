"""The export pipeline: a live model (collective over its ranks) or a saved checkpoint (one
process) to an atomic Hugging Face directory or DCP checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _comm as comm
from ..backends import TensorSource
from ._atomic import ExportError, commit_collectively, ensure_space
from ._hf_plan import (
    Convert,
    HFOptions,
    HFPlan,
    converter,
    is_transformers_model,
    plan_hf,
    write_index,
    write_model_files,
)
from ._hf_writer import HFWriter
from ._sources import model_source

FORMATS = ("hf", "dcp")
Writers = Mapping[str, set[int]]
"""Per source tensor, the global ranks that write it."""


def export_model(
    model: nn.Module,
    path: str | Path,
    *,
    format: str = "hf",
    dtype: torch.dtype | str | None = None,
    config: Any = None,
    tokenizer: Any = None,
    generation_config: Any = None,
    max_shard_size: int | str = "5GB",
    original_format: bool = True,
    rename: Callable[[str], str | None] | Mapping[str, str] | None = None,
    info: dict | None = None,
    progress: bool = True,
    source: TensorSource | None = None,
    group: dist.ProcessGroup | None = None,
    convert: Convert | None = None,
) -> Path:
    """Write ``model``'s current weights to ``path`` atomically. Collective over ``group``.

    ``format="hf"``: safetensors files (sharded with an index above ``max_shard_size``), plus
    ``config.json`` (with ``dtype``), generation config and tokenizer files for transformers
    models (or the ``config``/``tokenizer`` given); loadable with ``from_pretrained``. Tensors
    are gathered one at a time and each output file is written by one rank.
    ``format="dcp"``: each rank writes its own shards with ``torch.distributed.checkpoint``,
    no gather; loadable at any world size and convertible with :func:`convert_to_hf`.
    ``dtype`` casts the weights (default: as they are). ``original_format`` keeps the
    architecture's hub names (e.g. per-expert MoE weights) rather than the in-memory ones.
    ``rename`` maps the model's parameter names to those of the transformers architecture
    that ``config`` names (a dict, or a function returning None to leave a tensor out); with
    it a model that is not a transformers model (a DeepSpeed MoE, say) exports as one.
    ``source`` is where the tensors come from (a backend's ``source()``; default: the
    model's engine's, so DeepSpeed engines export their fp32 masters, MoE experts under global
    ids). ``convert`` maps each source tensor to the output tensors (a fused tensor split into
    several, as a Megatron GPTModel's ``linear_qkv`` into Llama's ``q_proj``, ``k_proj`` and
    ``v_proj``), in place of the architecture's own conversion.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: must be one of {', '.join(FORMATS)}")
    dtype = parse_dtype(dtype)
    source = source if source is not None else model_source(model)
    if format == "dcp":
        if source.dcp_state is None:
            raise ExportError(
                "format='dcp' writes DTensor or whole-tensor state; DeepSpeed partitions have "
                "no DCP layout: export format='hf', or save the state with Merger.save"
            )
        return commit_collectively(
            Path(path),
            lambda temp: _write_dcp(source.dcp_state, temp, dtype),
            None,
            {"kind": "dcp", "dtype": _name(dtype), **(info or {})},
            group,
        )
    meta, original_name = _renamed(source.meta(), rename)
    architecture = _architecture(source.module, config)

    def tensors(names: list[str], writers: Writers) -> Iterable[tuple[str, torch.Tensor]]:
        by_original = {original_name[n]: ranks for n, ranks in writers.items()}
        originals = source.tensors([original_name[n] for n in names], by_original)
        return ((new, t) for new, (_, t) in zip(names, originals))

    return write_hf(
        Path(path),
        meta,
        tensors,
        architecture,
        HFOptions(dtype, max_shard_size, original_format, progress, convert),
        (config, tokenizer, generation_config),
        info,
        group,
    )


def _renamed(
    meta: dict[str, torch.Tensor], rename
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``meta`` under the new names, and new name -> original name."""
    if rename is None:
        return meta, {n: n for n in meta}
    out, original = {}, {}
    for name, tensor in meta.items():
        new = rename(name) if callable(rename) else rename.get(name, name)
        if new is None:
            continue
        if new in original:
            raise ExportError(f"rename maps both {original[new]!r} and {name!r} to {new!r}")
        out[new], original[new] = tensor, name
    return out, original


def _architecture(module: nn.Module, config: Any) -> nn.Module | None:
    """The transformers model that decides tied weights and checkpoint names: the module
    itself, else a meta-device model built from ``config``, else None."""
    if is_transformers_model(module) or config is None:
        return module if is_transformers_model(module) else None
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def writer_ranks(
    plan: HFPlan, meta: dict[str, torch.Tensor], convert, world: int, group
) -> Writers:
    """Per source tensor, the global ranks that write a file holding any of its outputs (file
    i is written by rank i mod world), found by converting its meta tensor."""
    owner = {file: i % world for i, file in enumerate(plan.files)}
    out = {}
    for name in plan.sources:
        files = {plan.file_of[o] for o in convert(name, meta[name]) if o in plan.file_of}
        out[name] = {comm.global_rank(owner[f], group) for f in files}
    return out


def stream_hf(
    plan: HFPlan,
    tensors: Iterable[tuple[str, torch.Tensor]],
    temp: Path,
    rank: int,
    world: int,
    convert,
    progress: bool,
) -> dict:
    """Feed ``tensors`` (in plan order: full on the ranks that write them, meta elsewhere) to
    this rank's writer; the writer's error, if any.

    The walk over ``tensors`` continues after a write error so that collective gathers stay
    in step on every rank.
    """
    writer = HFWriter(plan, temp, rank, world, convert, progress)
    try:
        ensure_space(temp, sum(size for f, size in plan.file_sizes().items() if f in writer.mine))
    except ExportError as err:
        writer.error = str(err)
    for name, tensor in tensors:
        writer.add(name, tensor)
    files = writer.finish()
    return {"error": writer.error, "files": files}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16``, ``"bfloat16"`` or ``"torch.bfloat16"`` to a dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: not a torch dtype (e.g. 'bfloat16', 'float32')")
    return value


def _name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).replace("torch.", "") if dtype is not None else None


def _hf_info(plan: HFPlan, dtype: torch.dtype | None, info: dict | None) -> dict:
    return {
        "kind": "hf",
        "dtype": _name(dtype),
        "tensors": len(plan.outputs),
        "total_size": plan.total_size,
        **(info or {}),
    }


def _write_dcp(state: dict[str, torch.Tensor], temp: Path, dtype: torch.dtype | None) -> dict:
    import torch.distributed.checkpoint as dcp

    tensors = {k: v.detach() for k, v in state.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        dcp.save(tensors, checkpoint_id=str(temp))
    except OSError as err:
        return {"error": str(err)}
    return {}


def convert_to_hf(
    source: str | Path,
    path: str | Path,
    *,
    config: Any,
    method: str | None = None,
    dtype: torch.dtype | str | None = None,
    pma_key: str = "pma",
    model_key: str = "model",
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    original_format: bool = True,
    progress: bool = True,
    last: int | None = None,
    stride: int | None = None,
) -> Path:
    """Write a Hugging Face directory from a checkpoint, in this process alone.

    ``source`` is a pma_dist DCP export; a training checkpoint saved with
    ``dcp.save({model_key: ..., pma_key: merger, ...})``; or a directory of per-rank state files
    (``Merger.save``, a DeepSpeed checkpoint tag), which must hold every tensor of the model.
    From the last two the merge is computed here from the saved snapshots (``method``,
    ``last``, ``stride`` as in ``Merger.swapped``), with parameters that were not averaged
    taken from ``model_key``. ``config`` is a transformers config, or a path to a
    directory or file holding ``config.json``, naming the architecture.
    """
    from ._offline import OfflineSource

    dtype = parse_dtype(dtype)
    keys = {"pma_key": pma_key, "model_key": model_key}
    offline = OfflineSource(Path(source), config, method=method, last=last, stride=stride, **keys)
    return write_hf(
        Path(path),
        offline.meta(),
        offline.tensors,
        offline.model,
        HFOptions(dtype, max_shard_size, original_format, progress),
        (offline.config, tokenizer, None),
        {"source": offline.describe()},
        None,
        single_process=True,
    )


def write_hf(
    path: Path,
    meta: dict[str, torch.Tensor],
    tensors: Callable[[list[str], Writers], Iterable[tuple[str, torch.Tensor]]],
    architecture: nn.Module | None,
    options: HFOptions,
    model_files: tuple[Any, Any, Any],
    info: dict | None,
    group: dist.ProcessGroup | None,
    *,
    single_process: bool = False,
) -> Path:
    """The one HF pipeline, for live exports and offline conversion: plan the files from
    ``meta``, stream ``tensors(plan.sources)`` to the writing ranks, write the index and the
    model files (``config``, ``tokenizer``, ``generation_config``), commit atomically."""
    convert = options.convert or converter(architecture, options.original_format)
    plan = plan_hf(
        meta,
        architecture,
        dtype=options.dtype,
        max_shard_size=options.max_shard_size,
        convert=convert,
        source_names=options.convert is None,
    )
    rank, world = (0, 1) if single_process else (comm.rank(group), comm.world_size(group))

    def body(temp: Path) -> dict:
        stream = tensors(plan.sources, writer_ranks(plan, meta, convert, world, group))
        return stream_hf(plan, stream, temp, rank, world, convert, options.progress)

    def seal(temp: Path) -> None:
        write_index(temp, plan)
        write_model_files(temp, architecture, options.dtype, *model_files)

    return commit_collectively(path, body, seal, _hf_info(plan, options.dtype, info), group)
