"""PMA in the transformers ``Trainer``: ``Trainer(..., callbacks=[PMACallback(config)])``.

* ``on_train_begin`` builds the Merger over what the Trainer trains: DeepSpeed, the model and
  the ZeRO optimizer inside the one the hook gets, so the fp32 master partitions are averaged
  (an engine given a Merger by :func:`pma_dist.deepspeed.attach` keeps it, found through its
  optimizer, and steps it itself); FSDP2, the DTensor shards; DDP or one process, the
  unwrapped model. ``TrainingArguments(fsdp=...)`` on parameters left unsharded is refused.
* ``on_optimizer_step`` steps it with the step's global tokens: the growth of
  ``state.num_input_tokens_seen``, which the Trainer sums over ranks when
  ``include_num_input_tokens_seen`` is on, else ``pma.tokens_per_step``.
* Checkpoints: every rank's state goes to ``checkpoint-N/pma``. It is written *before* the
  Trainer writes ``checkpoint-N`` (into ``pma-staging-N`` beside it, as soon as
  ``control.should_save`` is set at the step's or epoch's end) and moved in by one rename in
  ``on_save``: a run stopped while PMA writes leaves no ``checkpoint-N`` at all, and one stopped
  before the rename is resumed from the staging directory. Old checkpoints are rotated before
  ``on_save``, never the newest; a save decided later (``save_strategy="best"``) is written in
  ``on_save``, after the Trainer's files.
* Resume: ``on_train_begin`` of a resumed run loads the state of the checkpoint resumed from.
* ``on_train_end`` exports the merge (``export_dir=``) and closes the Merger's hooks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import _comm as comm
from ..backends import zero_optimizer_of
from ..config import PMAConfig
from ..core import lacks_token_source
from ..merger import Merger
from ..state import has_files
from .deepspeed import merger_of, read_config

if TYPE_CHECKING:
    from torch import nn
    from transformers import TrainingArguments

log = logging.getLogger("pma_dist")

STATE_DIR = "pma"
"""The directory of a checkpoint that holds every rank's PMA state."""
STAGING = "pma-staging-{step}"
"""Where the state of the checkpoint at ``step`` is written before the Trainer writes it (a name
the Trainer neither resumes from nor rotates)."""


class PMACallback(TrainerCallback):
    """Keeps the pre-trained model average of a ``Trainer`` run (see the module docstring).

    ``config`` is a :class:`~pma_dist.PMAConfig` or a dict of its keys; None reads the
    ``"pma"`` section of ``TrainingArguments(deepspeed=...)``. ``export_dir`` writes the merged
    model there when training ends, with ``export_options`` passed to
    :meth:`~pma_dist.Merger.export` (``format``, ``method``, ``dtype``, ...). :attr:`merger` is
    the Merger once training has begun; it stays readable after training ends.
    """

    def __init__(
        self,
        config: PMAConfig | Mapping[str, Any] | None = None,
        *,
        export_dir: str | Path | None = None,
        **export_options: Any,
    ) -> None:
        self.config = None if config is None else PMAConfig.coerce(config, owner="PMACallback")
        self.export_dir = export_dir
        self.export_options = export_options
        self.merger: Merger | None = None
        self._engine_steps = False
        self._count_tokens = False
        self._tokens_seen = 0
        self._staged: int | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.close()
        self.merger, self._staged = None, None
        zero = zero_optimizer_of(optimizer)
        config = self.config or _deepspeed_section(args, zero)
        if not config.enabled:
            return
        _refuse_unsharded_fsdp(args, model)
        existing = merger_of(zero) if zero is not None else None
        self._engine_steps = existing is not None
        counted = args.include_num_input_tokens_seen not in ("no", False, None)
        self._count_tokens = counted and not self._engine_steps
        _check_token_source(existing.config if existing else config, self._count_tokens)
        self.merger = existing or Merger(model, optimizer, config)
        self._tokens_seen = state.num_input_tokens_seen
        if state.global_step > 0:
            self._resume(args, state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.merger is None or self._engine_steps:
            return
        tokens = None
        if self._count_tokens:
            tokens = state.num_input_tokens_seen - self._tokens_seen
            self._tokens_seen = state.num_input_tokens_seen
        self.merger.step(tokens)

    def on_step_end(self, args, state, control, **kwargs):
        """Write the state of a checkpoint the Trainer is about to save, before it does (the
        Trainer's ``DefaultFlowCallback`` has set ``should_save`` by now). Also at epoch end."""
        if self.merger is None or self._engine_steps or not control.should_save:
            return
        if self._staged == state.global_step:
            return
        path = _staging(args, state.global_step)
        if comm.rank(self.merger.process_group) == 0:
            shutil.rmtree(path, ignore_errors=True)
        self.merger.save(path)
        self._staged = state.global_step

    on_epoch_end = on_step_end

    def on_save(self, args, state, control, **kwargs):
        if self.merger is None or self._engine_steps:
            return
        target = _checkpoint(args, state.global_step) / STATE_DIR
        staged, self._staged = self._staged == state.global_step, None
        if not staged:
            self.merger.save(target)
        elif comm.rank(self.merger.process_group) == 0:  # every rank's file is on disk already
            shutil.rmtree(target, ignore_errors=True)
            os.replace(_staging(args, state.global_step), target)
        if comm.rank(self.merger.process_group) == 0:
            for stale in Path(args.output_dir).glob(STAGING.format(step="*")):
                shutil.rmtree(stale, ignore_errors=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.merger is None:
            return
        if self.export_dir is not None:
            self.merger.agree()  # counts as of every verdict, so "none usable" is told apart
            if self.merger.num_snapshots:
                options = {"tokenizer": kwargs.get("processing_class"), **self.export_options}
                self.merger.export(self.export_dir, **options)
            else:
                log.warning("no PMA snapshot was taken: nothing exported to %s", self.export_dir)
        self.close()

    def evaluate(self, trainer, **kwargs: Any) -> dict[str, float]:
        """``trainer.evaluate(**kwargs)`` with the merged weights swapped in: metrics named
        ``eval_pma_*`` (``metric_key_prefix`` overrides), the live weights restored bitwise.
        Collective: every rank calls it, during training (from a callback) or after."""
        if self.merger is None:
            raise RuntimeError("PMACallback.evaluate: no Merger until training begins")
        kwargs.setdefault("metric_key_prefix", "eval_pma")
        with self.merger.swapped():
            return trainer.evaluate(**kwargs)

    def close(self) -> None:
        """Remove the Merger's hooks (an engine's own Merger stays with the engine); its state
        stays readable."""
        if self.merger is not None and not self._engine_steps:
            self.merger.close()

    def _resume(self, args: TrainingArguments, step: int) -> None:
        """Load the state of the checkpoint resumed from: its ``pma`` directory, else the
        staging one of a run stopped before the rename, else an engine's own (DeepSpeed tag)."""
        checkpoint = _resumed_checkpoint(args, step)
        candidates = [checkpoint / STATE_DIR, checkpoint.parent / STAGING.format(step=step)]
        latest = checkpoint / "latest"
        if latest.is_file():
            candidates.append(checkpoint / latest.read_text().strip())
        found = next((c for c in candidates if has_files(c)), None)
        if found is None:
            log.warning("%s has no PMA state; averaging starts afresh", checkpoint)
            return
        self.merger.check_saved(found)
        self.merger.load(found)


def _deepspeed_section(args: TrainingArguments, deepspeed: Any) -> PMAConfig:
    """The ``"pma"`` section of ``TrainingArguments(deepspeed=...)`` (a dict or a JSON path);
    one with ``"enabled": false`` leaves the callback idle."""
    section = (read_config(args.deepspeed) or {}).get("pma") if deepspeed else None
    if section is None:
        where = 'TrainingArguments(deepspeed=...) has no "pma" section'
        raise ValueError(
            f"PMACallback(config=None): {where if deepspeed else 'this run does not use DeepSpeed'}"
            '; pass a config, e.g. PMACallback({"window": 10, "interval_tokens": "4B"})'
        )
    return PMAConfig.from_dict(section)


def _refuse_unsharded_fsdp(args: TrainingArguments, model: nn.Module) -> None:
    from torch.distributed.tensor import DTensor

    if args.fsdp and not any(isinstance(p, DTensor) for p in model.parameters()):
        raise RuntimeError(
            f"PMACallback: TrainingArguments(fsdp={args.fsdp!r}) is set but the model's "
            "parameters are not sharded (the Trainer fell back to replicated training, e.g. on "
            "CPU, or FSDP1 flat parameters); PMA state would be a full copy per rank. Use FSDP2 "
            '(fsdp_config={"fsdp_version": 2}) on accelerators, or DDP/DeepSpeed here.'
        )


def _check_token_source(config: PMAConfig, counted: bool) -> None:
    if lacks_token_source(config, counted):
        raise ValueError(
            "PMACallback: the PMA schedule counts tokens (interval_tokens/start_tokens) but no "
            "global token count is available: set TrainingArguments("
            "include_num_input_tokens_seen=True) (the Trainer sums it over ranks) or "
            "pma.tokens_per_step (an engine that steps its own Merger needs tokens_per_step)"
        )


def _checkpoint(args: TrainingArguments, step: int) -> Path:
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def _staging(args: TrainingArguments, step: int) -> Path:
    return Path(args.output_dir) / STAGING.format(step=step)


def _resumed_checkpoint(args: TrainingArguments, step: int) -> Path:
    """The checkpoint this run resumed from: ``args.resume_from_checkpoint``, else the one
    ``resume_from_checkpoint=True`` picks; either must have saved this very step."""
    for candidate in (args.resume_from_checkpoint, _checkpoint(args, step)):
        state = Path(candidate or "") / "trainer_state.json"
        if candidate and state.is_file() and json.loads(state.read_text())["global_step"] == step:
            return Path(candidate)
    raise RuntimeError(
        f"PMACallback: training resumed at step {step} from a checkpoint that is neither "
        f"TrainingArguments.resume_from_checkpoint nor {_checkpoint(args, step)}; set "
        "TrainingArguments(resume_from_checkpoint=<that checkpoint>) so PMA can load its state"
    )
