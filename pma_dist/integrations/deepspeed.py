"""PMA as a flag in a DeepSpeed config.

``pma_dist.deepspeed.initialize`` takes the arguments of ``deepspeed.initialize`` and returns
the same tuple. When the config has an enabled ``"pma"`` section (the keys of
:class:`~pma_dist.PMAConfig`), the engine gets a :class:`~pma_dist.Merger` as ``engine.pma``:

* after every optimizer step (the gradient-accumulation boundary of ``engine.step()``) it
  counts the step's tokens (``engine.pma.add_tokens`` per micro-batch, else
  ``tokens_per_step``) and snapshots the fp32 master partitions when one is due;
* ``engine.save_checkpoint`` writes every rank's averaging state next to DeepSpeed's files
  (``pma_index.json`` and one file per rank in the tag directory, before ``latest`` names
  the tag);
* ``engine.load_checkpoint`` checks that state against this run first, then loads it,
  resharded to this run's ranks and ZeRO stage; each rank reads its share once.

:func:`detach` puts the engine back as it was.
"""

from __future__ import annotations

import base64
import json
import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import PMAConfig
from ..merger import Merger
from ..state import has_files

log = logging.getLogger("pma_dist")


def read_config(config: Any) -> dict | None:
    """A DeepSpeed config given as a dict, a JSON path, or base64-encoded JSON, as a dict."""
    if config is None or isinstance(config, Mapping):
        return dict(config) if config is not None else None
    path = Path(str(config))
    if path.is_file():
        return json.loads(path.read_text())
    try:
        return json.loads(base64.urlsafe_b64decode(str(config)).decode())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(
            f"DeepSpeed config {config!r}: not a dict, a JSON file or base64 JSON"
        ) from None


def initialize(*args: Any, config: Any = None, config_params: Any = None, **kwargs: Any):
    """``deepspeed.initialize`` with PMA from the config's ``"pma"`` section; same return tuple.

    A bad ``"pma"`` section raises ``PMAConfigError`` naming the key before DeepSpeed starts.
    """
    import deepspeed

    from ..backends import check_deepspeed_version

    raw = config if config is not None else config_params
    if raw is None and args and getattr(args[0], "deepspeed_config", None):
        raw = args[0].deepspeed_config
    ds_config = read_config(raw)
    pma = PMAConfig.from_deepspeed(ds_config) if ds_config is not None else None
    if pma is not None:
        check_deepspeed_version(deepspeed.__version__)
    if ds_config is not None:
        kwargs["config"] = ds_config
    elif config_params is not None:
        kwargs["config_params"] = config_params
    result = deepspeed.initialize(*args, **kwargs)
    if pma is not None:
        attach(result[0], pma)
    return result


_PATCHED = ("step", "save_checkpoint", "load_checkpoint")
_MISSING = object()
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The Merger attached to each engine, by the engine's ZeRO optimizer: what a trainer's hooks
receive instead of the engine."""


def merger_of(optimizer: Any) -> Merger | None:
    """The Merger :func:`attach` gave the engine whose ZeRO optimizer is ``optimizer``, if any:
    one Merger per engine, however PMA was turned on."""
    return _ATTACHED.get(optimizer)


def attach(engine, config: PMAConfig | Mapping[str, Any]) -> Merger:
    """Give ``engine`` a Merger (``engine.pma``) stepped and checkpointed with the engine;
    :func:`detach` undoes it."""
    if getattr(engine, "pma", None) is not None:
        raise RuntimeError("this DeepSpeed engine already has a PMA Merger (engine.pma)")
    merger = Merger(engine, engine.optimizer, config)
    engine._pma_originals = {name: engine.__dict__.get(name, _MISSING) for name in _PATCHED}
    engine.pma = merger
    _ATTACHED[engine.optimizer] = merger
    _hook_step(engine, merger)
    _hook_checkpoints(engine, merger)
    return merger


def detach(engine) -> Merger | None:
    """Remove what :func:`attach` installed: the engine's own ``step``, ``save_checkpoint``
    and ``load_checkpoint`` come back, ``engine.pma`` goes and the Merger's hooks are removed.
    The detached Merger (its state still readable), or None if none was attached."""
    merger = getattr(engine, "pma", None)
    if merger is None:
        return None
    for name, original in engine.__dict__.pop("_pma_originals").items():
        if original is _MISSING:
            engine.__dict__.pop(name, None)
        else:
            setattr(engine, name, original)
    del engine.pma
    _ATTACHED.pop(engine.optimizer, None)
    merger.close()
    return merger


def _hook_step(engine, merger: Merger) -> None:
    take_step = engine.step

    def step(*args: Any, **kwargs: Any):
        boundary = engine.is_gradient_accumulation_boundary()
        out = take_step(*args, **kwargs)
        if boundary:
            merger.step()
        return out

    engine.step = step


def _hook_checkpoints(engine, merger: Merger) -> None:
    save = engine.save_checkpoint
    load = engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, *args: Any, **kwargs: Any):
        tag = tag if tag is not None else f"global_step{engine.global_steps}"
        merger.save(Path(save_dir) / str(tag))
        return save(save_dir, tag, *args, **kwargs)

    def load_checkpoint(load_dir, tag=None, *args: Any, **kwargs: Any):
        resolved = tag
        latest = Path(load_dir) / "latest"
        if resolved is None and latest.is_file():
            resolved = latest.read_text().strip()
        state_dir = Path(load_dir) / str(resolved) if resolved is not None else None
        has_state = state_dir is not None and has_files(state_dir)
        if has_state:
            merger.check_saved(state_dir)
        result = load(load_dir, tag, *args, **kwargs)
        if result[0] is None:
            return result
        if has_state:
            merger.load(state_dir)
        else:
            log.warning("%s has no PMA state; averaging starts afresh", state_dir)
        return result

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
