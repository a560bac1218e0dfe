"""PMA in Lightning: ``Trainer(..., callbacks=[PMACallback(config)])``.

* ``on_fit_start`` (after the strategy has wrapped the model and built the optimizer) builds the
  Merger over the LightningModule: FSDP2 DTensor shards under ``ModelParallelStrategy``, the
  replicated parameters under DDP or one process.
* The Merger steps once per optimizer step: ``on_train_batch_end`` steps it when
  ``trainer.global_step`` has moved, so gradient accumulation and manual optimization count
  optimizer steps, not batches. Tokens are global: ``pma.tokens_per_step``, or ``tokens=`` (a
  function of a batch giving *this rank's* tokens), summed over the accumulated batches and then
  over ranks by one scalar all-reduce per optimizer step.
* Checkpoints: Lightning writes callback state from rank 0 only, which holds one shard of an
  FSDP2 run. Under ``ModelParallelStrategy`` (sharded checkpoints) the state rides in the
  checkpoint's ``state_dict``, the one part every rank writes through DCP, so it reshards to
  another world size like the model does; ``on_load_checkpoint`` reads it back with DCP. Under
  DDP or one process every rank's slots are the same replica (``Merger.check_replicas``), so
  rank 0's copy in the callback state is the whole state.
* ``validate(trainer)`` runs ``trainer.validate`` on the merged weights; ``close()`` (also at
  ``on_fit_end``) removes the Merger's hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from .. import _comm as comm
from ..config import PMAConfig
from ..core import lacks_token_source
from ..merger import Merger

log = logging.getLogger("pma_dist")

STATE_KEY = "_pma_state"
"""The entry of a sharded checkpoint's ``state_dict`` that holds the PMA state."""


class PMACallback(Callback):
    """Keeps the pre-trained model average of a Lightning run (see the module docstring).

    ``config`` is a :class:`~pma_dist.PMAConfig` or a dict of its keys. ``tokens`` is a function
    of a training batch giving the tokens *this rank* consumed in it (the callback sums it over
    ranks); without it, a token schedule needs ``pma.tokens_per_step`` (global). :attr:`merger`
    is the Merger once fitting has begun; it stays readable after fitting ends.
    """

    def __init__(
        self,
        config: PMAConfig | Mapping[str, Any],
        *,
        tokens: Callable[[Any], int] | None = None,
    ) -> None:
        self.config = PMAConfig.coerce(config, owner="PMACallback")
        self.tokens = tokens
        self.merger: Merger | None = None
        self._last_step = 0
        self._local_tokens = 0
        self._loaded: dict[str, Any] | None = None
        self._sharded = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self.close()
        self.merger = None
        if not self.config.enabled:
            return
        if lacks_token_source(self.config, self.tokens is not None):
            raise ValueError(
                "PMACallback: the PMA schedule counts tokens (interval_tokens/start_tokens): pass "
                "PMACallback(config, tokens=lambda batch: <this rank's tokens>) or set "
                "pma.tokens_per_step (global tokens per optimizer step)"
            )
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        self.merger = Merger(pl_module, optimizer, self.config)
        self._sharded = _sharded(pl_module)
        if self._sharded and not _saves_sharded(trainer):
            raise RuntimeError(
                "PMACallback: the parameters are sharded (FSDP2) but this strategy writes "
                "checkpoints from rank 0 only, which holds one shard of the PMA state; use "
                "ModelParallelStrategy(save_distributed_checkpoint=True)"
            )
        if self._loaded is not None:  # DDP restores callbacks before the strategy is set up
            self.merger.load_state_dict(self._loaded)
            self._loaded = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step, self._local_tokens = trainer.global_step, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.merger is None:
            return
        if self.tokens is not None:
            self._local_tokens += int(self.tokens(batch))
        if trainer.global_step == self._last_step:
            return  # accumulating: no optimizer step yet
        self._last_step = trainer.global_step
        tokens = None
        if self.tokens is not None:
            tokens, self._local_tokens = _global_sum(self._local_tokens, self.merger, pl_module), 0
        self.merger.step(tokens)

    def state_dict(self) -> dict[str, Any]:
        """Rank 0's copy, which Lightning writes: the whole state unless it is sharded."""
        if self.merger is None:
            return {}
        if self._sharded:
            return {"sharded": True}
        return {"sharded": False, "merger": self.merger.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sharded") is False:
            if self.merger is None:
                self._loaded = state_dict["merger"]
            else:
                self.merger.load_state_dict(state_dict["merger"])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Every rank's shard into the part of the checkpoint every rank writes (DCP)."""
        if self.merger is not None and self._sharded:
            checkpoint["state_dict"][STATE_KEY] = self.merger.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if not state.get("sharded") or self.merger is None:
            return
        import torch.distributed.checkpoint as dcp

        path = Path(trainer.ckpt_path)
        if not path.is_dir():
            raise RuntimeError(f"PMACallback: {path} is not a sharded (DCP) checkpoint")
        loaded = {"state_dict": {STATE_KEY: self.merger.state_dict()}}
        dcp.load(loaded, checkpoint_id=path)
        self.merger.load_state_dict(loaded["state_dict"][STATE_KEY])

    def on_fit_end(self, trainer, pl_module) -> None:
        self.close()

    def validate(self, trainer, *args: Any, **kwargs: Any) -> list[dict[str, float]]:
        """``trainer.validate(*args, **kwargs)`` with the merged weights swapped in, metrics
        renamed ``pma_*``; the live weights are restored bitwise. Collective."""
        if self.merger is None:
            raise RuntimeError("PMACallback.validate: no Merger until fitting begins")
        with self.merger.swapped():
            results = trainer.validate(*args, **kwargs)
        return [{f"pma_{k}": v for k, v in r.items()} for r in results]

    def close(self) -> None:
        """Remove the Merger's hooks; its state stays readable."""
        if self.merger is not None:
            self.merger.close()


def _sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _saves_sharded(trainer) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = trainer.strategy
    return isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint


def _global_sum(local: int, merger: Merger, module: torch.nn.Module) -> int:
    """This optimizer step's tokens over all ranks (one scalar all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return local
    group = merger.process_group or dist.group.WORLD
    device = comm.collective_device(group, next(module.parameters()).device)
    total = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=merger.process_group)
    return int(total.item())
