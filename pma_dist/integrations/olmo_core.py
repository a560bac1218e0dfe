"""PMA in an OLMo-core ``Trainer``: ``callbacks={"pma": PMACallback(config)}``.

A drop-in for OLMo-core's ``ModelMergeCallback`` (same ``merge_step`` / ``merge_interval`` /
``merge_last_n_steps`` / ``output_suffix``) whose average survives a resume:

* The Merger is built over ``trainer.train_module`` (FSDP2 DTensor shards, or the whole
  parameters under DDP / one process) when the callback is attached, so that a checkpoint's
  state can be loaded into it before ``pre_train``.
* ``post_train_batch`` steps it with the step's *global* tokens: the growth of
  ``trainer.global_train_tokens_seen``, which the trainer counts over all data-parallel ranks.
  It runs before the ``CheckpointerCallback`` (priority 2 > 1), so a checkpoint taken at step N
  holds step N's snapshot.
* Checkpoints: the state rides in the trainer's own checkpoint. OLMo-core saves each callback's
  ``state_dict()`` in ``train/rank<r>.pt`` of the checkpoint, one file per rank, written with
  the checkpoint and loaded with it (atomically, no directory of our own to keep in step); the
  callback's state is the Merger's own ``state_dict()`` with every slot as this rank's local
  tensor. Those files are per rank, so after the checkpoint is written the state is also saved
  as per-rank files with an index under ``<checkpoint>/pma``, which a resume at another world
  size reads, resharded (without them it refuses, rather than average wrong shards).
* At a merge step the merged weights are swapped in (restored bitwise after), saved like
  ``ModelMergeCallback`` does (``step<N>-<suffix>/model_and_optim``, OLMo-core's own format)
  and, with ``evaluate_merged``, the trainer's evaluator callbacks run on them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from olmo_core.distributed.checkpoint import save_state_dict
from olmo_core.distributed.utils import barrier, get_rank
from olmo_core.io import clear_directory, dir_is_empty, join_path
from olmo_core.train.callbacks import Callback, EvaluatorCallback

from .. import _comm as comm
from ..config import PMAConfig
from ..errors import PMAStateError
from ..merger import Merger
from ..state import has_files

log = logging.getLogger("pma_dist")


@dataclass
class PMACallback(Callback):
    """Keeps the pre-trained model average of an OLMo-core run (see the module docstring).

    ``config`` is a :class:`~pma_dist.PMAConfig` or a dict of its keys; None gives
    ``ModelMergeCallback``'s average, SMA of every step over the last ``merge_last_n_steps``
    (a window of that many slots: prefer PMA's spacing, e.g. ``{"window": 10,
    "interval_tokens": "4B"}``). ``merge_step``/``merge_interval`` name the steps at which the
    merged checkpoint is written; with neither, nothing is written and :meth:`evaluate` or
    :attr:`merger` read the average. :attr:`merger` stays readable after ``fit`` returns.
    """

    priority: ClassVar[int] = 2
    """Before the ``CheckpointerCallback`` (1): a checkpoint at step N holds step N's snapshot."""

    config: PMAConfig | dict[str, Any] | None = None
    merge_step: int | list[int] = field(default_factory=list)
    merge_interval: int | None = None
    merge_last_n_steps: int = 500
    output_suffix: str = "pma"
    evaluate_merged: bool = True
    eval_prefix: str = "eval/pma"
    enabled: bool = True
    merger: Merger | None = field(default=None, init=False, repr=False)
    _tokens_seen: int = field(default=0, init=False, repr=False)
    _merge_steps: list[int] = field(default_factory=list, init=False, repr=False)
    _loaded: bool = field(default=False, init=False, repr=False)
    _saved_world: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = PMAConfig(method="sma", window=self.merge_last_n_steps, interval_steps=1)
        self.config = PMAConfig.coerce(self.config, owner="PMACallback")
        steps = [self.merge_step] if isinstance(self.merge_step, int) else self.merge_step
        if steps and self.merge_interval is not None:
            raise ValueError("PMACallback: set merge_step or merge_interval, not both")
        if self.merge_interval is not None and self.merge_interval <= 0:
            raise ValueError(f"PMACallback: merge_interval={self.merge_interval} must be positive")
        self._merge_steps = sorted(steps)

    def post_attach(self) -> None:
        if self.enabled and self.config.enabled:
            self._build()

    def pre_train(self) -> None:
        """Count tokens from here; a Merger that loaded no state starts its schedule at the
        trainer's step and tokens (a run resumed from a checkpoint saved before PMA was on)."""
        if self.merger is None:
            return
        self._tokens_seen = self.trainer.global_train_tokens_seen
        if not self._loaded and self.trainer.global_step > 0:
            schedule = self.merger.schedule.state_dict()
            schedule.update(steps_seen=self.trainer.global_step, tokens_seen=self._tokens_seen)
            self.merger.schedule.load_state_dict({**schedule, "interval": 0})  # new next_due
        if self.merge_interval is not None:
            last = self.trainer.max_steps or 0
            self._merge_steps = list(range(self.merge_interval, last + 1, self.merge_interval))

    def post_train_batch(self) -> None:
        if self.merger is None:
            return
        tokens = self.trainer.global_train_tokens_seen - self._tokens_seen
        self._tokens_seen = self.trainer.global_train_tokens_seen
        self.merger.step(tokens)
        if self.step in self._merge_steps:
            self.save_merged(self.step)

    def save_merged(self, step: int, **swap_options: Any) -> str:
        """Write the merged model as OLMo-core's checkpoint ``step<step>-<suffix>`` under the
        save folder (then evaluate it, with ``evaluate_merged``); the path. Collective.
        ``swap_options`` pick another merge (:meth:`~pma_dist.Merger.swapped`)."""
        merger = self._require()
        path = str(join_path(self.trainer.save_folder, f"step{step}-{self.output_suffix}"))
        merger.agree()
        if merger.num_snapshots == 0:
            log.warning("PMACallback: no snapshot yet at step %d, nothing merged", step)
            return path
        if get_rank() == 0 and not dir_is_empty(path):
            clear_directory(path)
        barrier()
        module = self.trainer.train_module
        with merger.swapped(**swap_options):
            save_state_dict(
                join_path(path, "model_and_optim"),
                module.state_dict_to_save(optim=False),
                process_group=self.trainer.checkpointer.process_group,
            )
            if self.evaluate_merged:
                self._run_evaluators(self.eval_prefix)
        log.info("PMACallback: merge of %d snapshots saved to %s", merger.window_size, path)
        return path

    def evaluate(self, prefix: str | None = None, **swap_options: Any) -> None:
        """Run the trainer's evaluator callbacks on the merged weights (metrics under
        ``prefix``, default :attr:`eval_prefix`); the live weights are restored bitwise.
        Collective: every rank calls it."""
        with self._require().swapped(**swap_options):
            self._run_evaluators(prefix or self.eval_prefix)

    def state_dict(self) -> dict[str, Any]:
        """The Merger's state with this rank's local slots (the trainer saves one file per
        rank, so no DTensor needs to travel); collective, as every rank saves."""
        if self.merger is None:
            return {}
        world = comm.world_size(self.merger.process_group)
        return {"world_size": world, "merger": _local_tensors(self.merger.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The per-rank state saved at this world size; at another, the checkpoint's ``pma``
        files are read instead once the checkpoint has loaded (:meth:`post_checkpoint_loaded`)."""
        if not state_dict or self.merger is None:
            return
        self._saved_world = state_dict["world_size"]
        if self._saved_world == comm.world_size(self.merger.process_group):
            self.merger.load_state_dict(state_dict["merger"])
            self._loaded = True

    def post_checkpoint_saved(self, path: Any) -> None:
        """Also the state as per-rank files with an index under ``<checkpoint>/pma`` (local
        checkpoints): what a resume at another world size reads, resharded. Collective."""
        if self.merger is not None and "://" not in str(path):
            self.merger.save(Path(str(path)) / STATE_DIR)

    def post_checkpoint_loaded(self, path: Any) -> None:
        saved, self._saved_world = self._saved_world, None
        if self.merger is None or saved in (None, comm.world_size(self.merger.process_group)):
            return
        files = Path(str(path)) / STATE_DIR
        if "://" in str(path) or not has_files(files):
            raise PMAStateError(
                f"PMACallback: this checkpoint's PMA state was saved by {saved} ranks and this "
                f"run has {comm.world_size(self.merger.process_group)}, and {files} holds no "
                f"per-rank PMA files to reshard from; resume at {saved} ranks, or drop the "
                "callback's state to restart the average"
            )
        self.merger.load(files)
        self._loaded = True

    def close(self) -> None:
        """Remove the Merger's hooks (the trainer calls this as ``fit`` exits); its state stays
        readable."""
        if self.merger is not None:
            self.merger.close()

    def _build(self) -> None:
        module = self.trainer.train_module
        model = getattr(module, "model", None)
        if model is None:
            raise TypeError(f"PMACallback: {type(module).__name__} has no .model to average")
        self.merger = Merger(model, getattr(module, "optim", None), self.config)

    def _require(self) -> Merger:
        if self.merger is None:
            raise RuntimeError("PMACallback: no Merger (disabled, or not attached to a trainer)")
        return self.merger

    def _run_evaluators(self, prefix: str) -> None:
        evaluators = [
            cb for cb in self.trainer.callbacks.values() if isinstance(cb, EvaluatorCallback)
        ]
        for callback in evaluators:
            callback.perform_eval(prefix=prefix)


def _local_tensors(state: Any) -> Any:
    """``state`` with every DTensor replaced by its local tensor, nested dicts kept."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, Mapping):
        return {k: _local_tensors(v) for k, v in state.items()}
    if isinstance(state, DTensor):
        return state.to_local()
    return state


STATE_DIR = "pma"
"""The directory of a checkpoint that holds the per-rank PMA files."""

__all__ = ["PMACallback"]
