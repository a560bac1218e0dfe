"""One line after ``accelerator.prepare(...)``: ``merger = attach(accelerator, model, optimizer)``.

* DeepSpeed plugin: the ``"pma"`` section rides in the plugin's DeepSpeed config; the engine
  gets ``engine.pma`` stepped by the engine (inside ``accelerator.backward``) and checkpointed
  by ``save_state``/``save_checkpoint``, exactly as with :func:`pma_dist.deepspeed.initialize`.
* FSDP2 plugin or DDP: a Merger over the prepared model; call ``merger.step()`` after
  ``optimizer.step()``. If FSDP was asked for but the parameters are not sharded (Accelerate
  falls back silently on some setups), attaching refuses: a "sharded" average would really be
  a full replica per rank.

:func:`detach` undoes either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..backends import unwrap_optimizer
from ..config import PMAConfig
from ..merger import Merger


def attach(
    accelerator,
    model: nn.Module,
    optimizer=None,
    config: PMAConfig | Mapping[str, Any] | None = None,
) -> Merger:
    """A Merger for a model prepared by ``accelerator`` (see the module docstring)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from ..backends import is_deepspeed_engine
        from .deepspeed import attach as attach_engine

        wrapped = accelerator.deepspeed_engine_wrapped
        engine = model if is_deepspeed_engine(model) else wrapped.engine
        if config is None:
            config = PMAConfig.from_deepspeed(engine.config)
            if config is None:
                raise ValueError(
                    "attach(accelerator, ...): the DeepSpeed plugin's config has no enabled "
                    '"pma" section; add one or pass config='
                )
        return attach_engine(engine, config)
    if config is None:
        raise ValueError("attach(accelerator, model, optimizer, config): config is required")
    if _fsdp_requested(accelerator):
        from torch.distributed.tensor import DTensor

        if not any(isinstance(p, DTensor) for p in model.parameters()):
            raise RuntimeError(
                "attach(accelerator, ...): FSDP was requested but the prepared model's "
                "parameters are not sharded (Accelerate fell back to replicated training, e.g. "
                "on CPU); PMA state would be a full copy per rank. Use FSDP2 "
                "(fsdp_version=2) on accelerators, or DDP/DeepSpeed here."
            )
    return Merger(model, unwrap_optimizer(optimizer), config)


def detach(accelerator, model: nn.Module, merger: Merger | None = None) -> None:
    """Undo :func:`attach`: with the DeepSpeed plugin the engine gets its own ``step`` and
    checkpoint methods back (:func:`pma_dist.deepspeed.detach`); otherwise ``merger`` (if
    given) removes its hooks. Its state stays readable."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from ..backends import is_deepspeed_engine
        from .deepspeed import detach as detach_engine

        engine = (
            model if is_deepspeed_engine(model) else accelerator.deepspeed_engine_wrapped.engine
        )
        detach_engine(engine)
    elif merger is not None:
        merger.close()


def _fsdp_requested(accelerator) -> bool:
    import os

    from accelerate.utils import DistributedType

    return (
        accelerator.distributed_type == DistributedType.FSDP
        or getattr(accelerator.state, "fsdp_plugin", None) is not None
        or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    )
