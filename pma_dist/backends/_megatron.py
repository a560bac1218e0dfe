"""Backend for Megatron-Core's distributed optimizer: averages the fp32 main shards each
data-parallel rank owns, never the bf16 working copies, with no communication.

``get_megatron_optimizer`` returns a ``ChainedOptimizer`` (several, one per kind of parameter,
when the model has experts); each ``DistributedOptimizer`` in it keeps, per parameter group,
the model parameters this rank owns a range of beside their fp32 main shard
(``model_float16_groups`` / ``shard_fp32_from_float16_groups`` for bf16 and fp16 parameters;
``model_fp32_groups`` / ``shard_fp32_groups``, views into the parameters, for fp32 ones). A
range is ``_get_model_param_range_map(p)["param"]``: a contiguous run of the flattened
parameter, cut where the data-parallel shards of the gradient buffer are cut. Each run is one
shard here, named by the parameter's name with its offset as a fragment, so per-rank saves
reshard to any data-parallel size.

Under tensor parallelism a rank holds a slice of each sliced parameter (``tensor_model_parallel``
along ``partition_dim``, in ``partition_stride`` parts: a gated MLP's fused gate and up
projections are sliced each); its range is described in the whole parameter's elements, one
fragment per stretch that is contiguous in both (:class:`SliceLayout`), so the same per-rank
files reshard to another tensor-parallel size too. Parameters every tensor-parallel rank holds
whole (norms) are replicas, as under DDP.

Writes (swaps, ``apply``) go to the mains, then to the model parameters as Megatron's own step
sends them: ``_copy_main_params_to_model_params()`` into each rank's range of the parameter
buffer, then ``start_param_sync(force_sync=True)``, the all-gather of every model chunk.

These are private attributes of Megatron-Core's optimizer, so only the tested releases are
accepted (``_megatron_probe.SUPPORTED_VERSIONS``), and the settings whose mains live
elsewhere are refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._base import Fragment, Shard, canonical_name, floating_buffers
from ._master_source import FragmentSource
from ._megatron_names import LlamaLayout
from ._megatron_probe import check_version, is_megatron_optimizer
from ._params import buffer_shards


class MegatronBackend:
    """Shards of a Megatron-Core model trained by its distributed optimizer."""

    def __init__(self, model: nn.Module, optimizer: Any, *, buffers: bool = True) -> None:
        check_version()
        self._model = model
        self._buffers = buffers
        chained = getattr(optimizer, "chained_optimizers", [optimizer])
        self.optimizers = [o for o in chained if not getattr(o, "is_stub_optimizer", False)]
        """The optimizers whose mains are averaged (stub optimizers, which own nothing, aside)."""
        _refuse_unsupported(optimizer, self.optimizers)
        from megatron.core import parallel_state

        self._names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
        self._chunks = list(getattr(optimizer, "model_chunks", []))
        self._tp = (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        )
        self._fragments: dict[int, tuple[Fragment, ...]] = {}
        self._config = getattr(self._chunks[0] if self._chunks else model, "config", None)

    def shards(self) -> list[Shard]:
        out = []
        for opt in self.optimizers:
            pairs = (
                (opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                (opt.model_fp32_groups, opt.shard_fp32_groups),
            )
            for model_groups, main_groups in pairs:
                for params, mains in zip(model_groups, main_groups):
                    out.extend(self._shard(opt, p, main) for p, main in zip(params, mains))
        return out + buffer_shards(self._model, self._buffers)

    def _shard(self, opt: Any, param: torch.Tensor, main: torch.Tensor) -> Shard:
        if id(param) not in self._names:
            raise ValueError(
                "MegatronBackend: the optimizer trains a parameter of shape "
                f"{tuple(param.shape)} that the model does not hold; pass the model chunk the "
                "optimizer was built for"
            )
        name = self._names[id(param)]
        if id(param) not in self._fragments:
            self._fragments[id(param)] = self._describe(opt, name, param)
        fragments = self._fragments[id(param)]
        return Shard(name, main, fragments[0].shape, None, fragments)

    def _describe(self, opt: Any, name: str, param: torch.Tensor) -> tuple[Fragment, ...]:
        """Where this rank's range of ``param`` lies in the whole parameter: one run, or, for a
        tensor-parallel slice, a run per stretch that is contiguous in both."""
        span = opt._get_model_param_range_map(param)["param"]
        layout = self._slice(param)
        if layout is None:
            return (Fragment(name, tuple(param.shape), span.start, span.size),)
        return tuple(
            Fragment(name, layout.global_shape, start, numel, local - span.start)
            for start, numel, local in layout.runs(span.start, span.end)
        )

    def master_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every trained parameter's whole shape, by name (tensor-parallel slices made whole),
        from this rank alone."""
        out = {}
        for name, param in self._model.named_parameters():
            layout = self._slice(param)
            if param.requires_grad:
                out[canonical_name(name)] = layout.global_shape if layout else tuple(param.shape)
        return out

    def _slice(self, param: torch.Tensor) -> SliceLayout | None:
        """How ``param`` is this rank's tensor-parallel slice of a whole, or None when this
        rank holds it whole."""
        if not getattr(param, "tensor_model_parallel", False) or self._tp[1] == 1:
            return None
        stride = getattr(param, "partition_stride", 1)
        return SliceLayout(tuple(param.shape), param.partition_dim, *self._tp, chunks=stride)

    def source(self) -> FragmentSource:
        """The full fp32 mains (and floating buffers), for export: each element sent by the
        one rank whose main holds it (tensor-parallel rank 0 for the parameters every
        tensor-parallel rank holds whole)."""
        whole = {canonical_name(n) for n, p in self._model.named_parameters() if not self._slice(p)}
        replica = self._tp[0] > 0
        buffers = dict(floating_buffers(self._model)) if self._buffers else {}
        sends = lambda shard: not (replica and shard.name in whole)  # noqa: E731
        return FragmentSource(self._model, self, self.master_shapes(), buffers, sends)

    def hf_convert(self) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
        """How each full main becomes the tensors of a Hugging Face Llama checkpoint (a
        Llama-equivalent GPTModel: ``_megatron_names``)."""
        return LlamaLayout.of(self._config).convert

    def step_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers whose ``step`` writes the mains."""
        return [opt.optimizer for opt in self.optimizers]

    def begin_write(self) -> None:
        pass

    @torch.no_grad()
    def end_write(self) -> None:
        """Push the mains to the model parameters on every rank. Collective."""
        for opt in self.optimizers:
            opt._copy_main_params_to_model_params()
        for chunk in self._chunks:
            chunk.start_param_sync(force_sync=True)


@dataclass(frozen=True)
class SliceLayout:
    """A tensor-parallel rank's slice of a parameter: ``local_shape``, cut from the whole along
    ``dim`` into ``size`` equal slices, of which this is slice ``rank``. With ``chunks`` > 1
    (Megatron's ``partition_stride``: 2 for the fused gate and up projections of a gated
    MLP's ``linear_fc1``) the whole is ``chunks`` parts along ``dim``, each cut so, and the
    slice holds its piece of each, one after the other."""

    local_shape: tuple[int, ...]
    dim: int
    rank: int
    size: int
    chunks: int = 1

    @property
    def global_shape(self) -> tuple[int, ...]:
        shape = list(self.local_shape)
        shape[self.dim] *= self.size
        return tuple(shape)

    def runs(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """``(whole start, numel, local start)`` of each stretch of local elements ``[lo, hi)``
        that is contiguous in the whole parameter, in order."""
        inner = math.prod(self.local_shape[self.dim + 1 :])
        part = self.local_shape[self.dim] // self.chunks
        length, whole = part * inner, self.local_shape[self.dim] * self.size * inner
        first = lo // length
        for index in range(first, -(-hi // length)):
            o, j = divmod(index, self.chunks)
            local = index * length
            start = o * whole + (j * part * self.size + self.rank * part) * inner
            a, b = max(lo, local), min(hi, local + length)
            if a < b:
                yield start + a - local, b - a, a


def _refuse_unsupported(optimizer: Any, optimizers: list[Any]) -> None:
    """Raise ``ValueError`` naming the setting for layouts whose mains this backend cannot
    read: optimizers other than the distributed one, the precision-aware optimizer, optimizer
    CPU offload, Megatron-FSDP, pipeline and expert model parallelism, and experts sliced
    otherwise than the dense layers."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    def refuse(setting: str, why: str) -> None:
        raise ValueError(f"pma_dist's Megatron backend: {setting} is not supported ({why})")

    for opt in optimizers:
        if not isinstance(opt, DistributedOptimizer):
            refuse(
                f"{type(opt).__name__}",
                "it averages the distributed optimizer's main shards: build the optimizer with "
                "OptimizerConfig(use_distributed_optimizer=True)",
            )
        config, ddp = opt.config, opt.ddp_config
        if config.use_precision_aware_optimizer:
            refuse("OptimizerConfig.use_precision_aware_optimizer = True", "its mains live in "
                   "the torch optimizer's state; set it to False")  # fmt: skip
        if config.optimizer_cpu_offload:
            refuse("OptimizerConfig.optimizer_cpu_offload = True", "its mains live in the "
                   "offloaded optimizer; set it to False")  # fmt: skip
        if getattr(config, "overlap_param_gather_with_optimizer_step", False):
            refuse("OptimizerConfig.overlap_param_gather_with_optimizer_step = True", "its "
                   "all-gather of the parameters is still in flight after the step, so a swap "
                   "would race it; set it to False")  # fmt: skip
        if ddp.use_megatron_fsdp:
            refuse("DistributedDataParallelConfig.use_megatron_fsdp = True", "Megatron-FSDP "
                   "shards parameters its own way; use the distributed optimizer")  # fmt: skip
    pipeline = parallel_state.get_pipeline_model_parallel_world_size()
    if pipeline > 1:
        refuse(f"pipeline_model_parallel_size = {pipeline}", "each stage names its layers from 0")
    experts = parallel_state.get_expert_model_parallel_world_size()
    if experts > 1:
        refuse(
            f"expert_model_parallel_size = {experts}",
            "Megatron-Core's local expert layers are not marked expert-parallel, so experts "
            "train as dense parameters there, and Transformer Engine's are not tested",
        )
    tensor = parallel_state.get_tensor_model_parallel_world_size()
    expert_tensor = parallel_state.get_expert_tensor_parallel_world_size()
    if expert_tensor != tensor:
        refuse(
            f"expert_tensor_parallel_size = {expert_tensor} with tensor_model_parallel_size = "
            f"{tensor}",
            "experts are sliced like the dense layers only",
        )
    if len(getattr(optimizer, "model_chunks", [])) > 1:
        refuse("several model chunks (virtual pipeline parallelism)", "one chunk per rank")


def backend_for(model: nn.Module, optimizer: Any, buffers: bool) -> MegatronBackend | None:
    """A model trained by a Megatron-Core optimizer."""
    if not is_megatron_optimizer(optimizer):
        return None
    return MegatronBackend(model, optimizer, buffers=buffers)
