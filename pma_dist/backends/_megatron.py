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

Writes (swaps, ``apply``) go to the mains, then to the model parameters as Megatron's own step
sends them: ``_copy_main_params_to_model_params()`` into each rank's range of the parameter
buffer, then ``start_param_sync(force_sync=True)``, the all-gather of every model chunk.

These are private attributes of Megatron-Core's optimizer, so only the tested releases are
accepted (``_megatron_probe.SUPPORTED_VERSIONS``), and the settings whose mains live
elsewhere are refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._base import Fragment, Shard, canonical_name
from ._megatron_probe import check_version, is_megatron_optimizer
from ._params import buffer_shards


class MegatronBackend:
    """Shards of a Megatron-Core model trained by its distributed optimizer."""

    def __init__(self, model: nn.Module, optimizer: Any, *, buffers: bool = True) -> None:
        check_version()
        self._model = model
        self._buffers = buffers
        self.optimizers = list(getattr(optimizer, "chained_optimizers", [optimizer]))
        """The optimizers whose mains are averaged (stub optimizers, which own nothing, aside)."""
        self.optimizers = [o for o in self.optimizers if not getattr(o, "is_stub_optimizer", False)]
        _refuse_unsupported(optimizer, self.optimizers)
        self._names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
        self._chunks = list(getattr(optimizer, "model_chunks", []))

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
        name, shape = self._names[id(param)], tuple(param.shape)
        span = opt._get_model_param_range_map(param)["param"]
        fragment = Fragment(name, shape, span.start, span.size, 0)
        return Shard(name, main, shape, None, (fragment,))

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


def _refuse_unsupported(optimizer: Any, optimizers: list[Any]) -> None:
    """Raise ``ValueError`` naming the setting for layouts whose mains this backend cannot
    read: optimizers other than the distributed one, the precision-aware optimizer, optimizer
    CPU offload, Megatron-FSDP, and pipeline, tensor or expert model parallelism."""
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
        if ddp.use_megatron_fsdp:
            refuse("DistributedDataParallelConfig.use_megatron_fsdp = True", "Megatron-FSDP "
                   "shards parameters its own way; use the distributed optimizer")  # fmt: skip
    sizes = {
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
    }
    for setting, size in sizes.items():
        if size > 1:
            refuse(
                f"{setting} = {size}",
                "names of model-parallel slices are not global yet; data parallelism only",
            )
    if len(getattr(optimizer, "model_chunks", [])) > 1:
        refuse("several model chunks (virtual pipeline parallelism)", "one chunk per rank")


def backend_for(model: nn.Module, optimizer: Any, buffers: bool) -> MegatronBackend | None:
    """A model trained by a Megatron-Core optimizer."""
    if not is_megatron_optimizer(optimizer):
        return None
    return MegatronBackend(model, optimizer, buffers=buffers)
