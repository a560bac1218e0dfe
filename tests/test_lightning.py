"""Lightning with ``PMACallback`` on CPU ranks (gloo): FSDP2 under ``ModelParallelStrategy``,
and DDP.

References are float64 merges of the weights a separate callback records after every optimizer
step, never the Merger's own output. Each rank's batch is its slice of one global batch per
step, chosen by the step (``tests.support.models.batch``), so a resumed run and a run at
another world size see the same global batches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402

from pma_dist.integrations.lightning import PMACallback  # noqa: E402
from pma_dist.testing import (  # noqa: E402
    assert_bitwise_equal,
    assert_close_rel,
    run_ranks,
    window_reference,
)
from tests.support.models import (  # noqa: E402
    GLOBAL_BATCH,
    SEQ,
    VOCAB,
    full_state,
    load_full_state,
    loss_of,
)

pytestmark = pytest.mark.integration

WORLD = 2
STEPS, SAVE_AT = 8, 5
TOKENS_PER_STEP = GLOBAL_BATCH * (SEQ + 1)
PMA = {"method": "wma", "window": 3, "interval_tokens": 2 * TOKENS_PER_STEP}
"""A snapshot every 2nd step when tokens are summed over ranks (every 4th on local ones); the
checkpoint at step 5 is mid-window."""


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return STEPS * GLOBAL_BATCH

    def __getitem__(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(5000 + index)
        return torch.randint(0, VOCAB, (SEQ + 1,), generator=g)


class Module(pl.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        from tests.support.models import make_model

        self.shard = shard
        self.model = make_model()

    def configure_model(self) -> None:
        from torch.distributed.tensor import DTensor

        if self.shard and not isinstance(next(self.model.parameters()), DTensor):
            from tests.support.models import shard_fsdp2

            shard_fsdp2(self.model, self.trainer.world_size)

    def training_step(self, batch, batch_idx):
        from tests.support.models import batch as step_batch

        # the data of the optimizer step, not of the loader's position: Lightning restarts a
        # non-resumable loader at its first batch on resume
        assert batch.shape == (GLOBAL_BATCH // self.trainer.world_size, SEQ + 1)
        tokens = step_batch(self.global_step, self.global_rank, self.trainer.world_size)
        return loss_of(self.model, tokens)

    def validation_step(self, batch, batch_idx):
        self.log("loss", loss_of(self.model, batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            Tokens(), batch_size=GLOBAL_BATCH // self.trainer.world_size
        )

    def val_dataloader(self):
        return torch.utils.data.DataLoader(
            Tokens(), batch_size=GLOBAL_BATCH // self.trainer.world_size
        )


class Recorder(pl.Callback):
    """Every parameter, gathered in full, after every optimizer step."""

    def __init__(self) -> None:
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(full_state(pl_module.model))


def _trainer(world_size: int, callbacks: list, shard: bool, root: Path, **options) -> pl.Trainer:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    strategy = ModelParallelStrategy() if shard else DDPStrategy(process_group_backend="gloo")
    return pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        default_root_dir=str(root),
        **options,
    )


def _fit(
    world_size: int,
    root: Path,
    shard: bool,
    ckpt_path=None,
    save=False,
    steps=STEPS,
    validate=False,
) -> dict:
    recorder, callback = Recorder(), PMACallback(PMA, tokens=lambda batch: batch.numel())
    callbacks = [recorder, callback]
    if save:
        from lightning.pytorch.callbacks import ModelCheckpoint

        saver = ModelCheckpoint(root / "ckpt", every_n_train_steps=SAVE_AT, save_top_k=-1)
        callbacks.append(saver)
    trainer = _trainer(
        world_size, callbacks, shard, root, enable_checkpointing=save, max_steps=steps
    )
    module = Module(shard)
    trainer.fit(module, ckpt_path=ckpt_path)
    out = {"weights": recorder.weights, "history": callback.merger.history}
    out["hooks"] = len(callback.merger._hooks)
    with callback.merger.swapped():
        out["merged"] = full_state(module.model)
    out["live"] = full_state(module.model)
    if validate:
        out["val_live"] = trainer.validate(module, verbose=False)[0]
        out["val_pma"] = callback.validate(trainer, module, verbose=False)[0]
        out["after_validate"] = full_state(module.model)
        snapshots = [recorder.weights[step - 1] for step, _ in callback.merger.history]
        load_full_state(module.model, window_reference(snapshots, PMA["window"], PMA["method"]))
        out["val_reference"] = trainer.validate(module, verbose=False)[0]
        load_full_state(module.model, out["live"])
    return out


def _fsdp_worker(rank: int, world_size: int, root: str) -> dict:
    root = Path(root)
    full = _fit(world_size, root / "full", shard=True, save=True, validate=True)
    ckpt = next((root / "full" / "ckpt").glob(f"*step={SAVE_AT}*"))
    resumed = _fit(world_size, root / "resumed", shard=True, ckpt_path=ckpt)
    return {"full": full, "resumed": resumed, "ckpt": str(ckpt)} if rank == 0 else {}


def _resume_worker(rank: int, world_size: int, ckpt: str, root: str) -> dict:
    """Load the checkpoint and stop there: the state as resharded, before any training."""
    return _fit(world_size, Path(root), shard=True, ckpt_path=ckpt, steps=SAVE_AT)


def test_fsdp2_merge_resume_and_reshard(tmp_path: Path) -> None:
    result = run_ranks(_fsdp_worker, WORLD, str(tmp_path), timeout=300)[0]
    full = result["full"]
    assert len(full["weights"]) == STEPS
    assert full["history"] == [(s, TOKENS_PER_STEP * s) for s in (4, 6, 8)], "global tokens"
    expected = window_reference(full["weights"][1::2], PMA["window"], PMA["method"])
    assert_close_rel(full["merged"], expected, 1e-6, "FSDP2 merge")
    assert full["hooks"] == 0, "hooks removed at fit end"
    assert Path(result["ckpt"]).is_dir(), "a sharded (DCP) checkpoint"
    _check_validate(full)

    resumed = result["resumed"]
    assert resumed["history"] == full["history"]
    assert_bitwise_equal(resumed["live"], full["live"], "weights resumed")
    assert_bitwise_equal(resumed["merged"], full["merged"], "merge resumed mid-window")

    one = run_ranks(_resume_worker, 1, result["ckpt"], str(tmp_path / "one"), timeout=200)[0]
    assert one["history"] == [(s, TOKENS_PER_STEP * s) for s in (2, 4)]
    assert_bitwise_equal(one["live"], full["weights"][SAVE_AT - 1], "weights at world size 1")
    expected = window_reference(full["weights"][1:SAVE_AT:2], PMA["window"], PMA["method"])
    assert_close_rel(one["merged"], expected, 1e-6, "merge resharded to world size 1")


def _check_validate(full: dict) -> None:
    """``validate`` ran on the merge (the loss of the float64 reference weights) and put the
    live weights back."""
    assert set(full["val_pma"]) == {"pma_loss"}
    pma_loss = full["val_pma"]["pma_loss"]
    assert pma_loss == pytest.approx(full["val_reference"]["loss"], rel=1e-5)
    assert pma_loss != pytest.approx(full["val_live"]["loss"], rel=1e-4)
    assert_bitwise_equal(full["after_validate"], full["live"], "live weights after validate")


def _ddp_worker(rank: int, world_size: int, root: str) -> dict:
    root = Path(root)
    full = _fit(world_size, root / "full", shard=False, save=True, validate=True)
    ckpt = next((root / "full" / "ckpt").glob(f"*step={SAVE_AT}*"))
    resumed = _fit(world_size, root / "resumed", shard=False, ckpt_path=ckpt)
    return {"full": full, "resumed": resumed} if rank == 0 else {}


def test_ddp_merge_and_resume(tmp_path: Path) -> None:
    result = run_ranks(_ddp_worker, WORLD, str(tmp_path), timeout=300)[0]
    full, resumed = result["full"], result["resumed"]
    assert full["history"] == [(s, TOKENS_PER_STEP * s) for s in (4, 6, 8)], "global tokens"
    expected = window_reference(full["weights"][1::2], PMA["window"], PMA["method"])
    assert_close_rel(full["merged"], expected, 1e-6, "DDP merge")
    _check_validate(full)
    assert resumed["history"] == full["history"]
    assert_bitwise_equal(resumed["live"], full["live"], "weights resumed")
    assert_bitwise_equal(resumed["merged"], full["merged"], "merge resumed mid-window")
