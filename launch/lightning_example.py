"""Lightning + FSDP2 + PMA in one file: a small MLP language model on random tokens, the merged
model validated beside the live one.

    python launch/lightning_example.py            # 2 CPU processes, Lightning launches them
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from pma_dist.integrations.lightning import PMACallback

VOCAB, SEQ, BATCH = 64, 32, 8


class LM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(VOCAB, 64), nn.Linear(64, 256), nn.GELU(),
                                 nn.Linear(256, VOCAB))  # fmt: skip

    def configure_model(self) -> None:
        if getattr(self, "_sharded", False):  # trainer.validate calls it again
            return
        self._sharded = True
        for layer in self.net:  # shard each layer, then the root, over Lightning's mesh
            fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.net(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(0, VOCAB, (512, SEQ + 1)), BATCH)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(0, VOCAB, (64, SEQ + 1)), BATCH)


if __name__ == "__main__":
    pma = PMACallback({"window": 4, "interval_steps": 8}, tokens=lambda batch: batch.numel())
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(), max_steps=64,
        callbacks=[pma], logger=False, enable_progress_bar=False,
    )  # fmt: skip
    model = LM()
    trainer.fit(model)
    print(trainer.validate(model, verbose=False), pma.validate(trainer, model, verbose=False))
