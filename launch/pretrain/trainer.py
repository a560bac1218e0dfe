"""One training setup behind one interface, FSDP2 or DeepSpeed: step, evaluate (live and
merged), checkpoint, export."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pma_dist import Merger, PMAConfig
from pma_dist.export import export_model

from .config import RunConfig
from .model import build_model, shard_fsdp2


def wsd_lr(step: int, cfg, branch: str) -> float:
    """Warmup-stable-decay: linear warmup, constant, and in branch ``b`` a cosine decay to
    ``lr * final_lr_ratio`` over the branch."""
    s = cfg.schedule
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if branch != "b" or step < s.fork_step:
        return s.lr
    progress = min((step - s.fork_step) / s.branch_steps, 1.0)
    floor = s.lr * s.final_lr_ratio
    return floor + (s.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(
        self, cfg: RunConfig, device: torch.device, vocab_size: int, init_from: str | None
    ) -> None:
        self.cfg, self.device = cfg, device
        self.world = dist.get_world_size()
        self.tokens_per_step = cfg.data.batch_per_rank * cfg.data.seq_len * self.world
        pma = dict(cfg.pma)
        if "interval_steps" in pma and pma.get("interval_tokens") is None:
            pma["interval_tokens"] = pma.pop("interval_steps") * self.tokens_per_step
        pma.setdefault("tokens_per_step", self.tokens_per_step)
        self.pma_config = PMAConfig.from_dict(pma)
        model = build_model(cfg.model, vocab_size, cfg.data.seq_len, cfg.seed, init_from)
        if cfg.engine == "fsdp2":
            self.model = shard_fsdp2(model.to(device), device)
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=cfg.schedule.lr, weight_decay=cfg.schedule.weight_decay
            )
            self.merger = Merger(self.model, self.optimizer, self.pma_config)
            self.engine = None
        elif cfg.engine == "deepspeed":
            from pma_dist.deepspeed import initialize

            optimizer = torch.optim.AdamW(
                model.parameters(), lr=cfg.schedule.lr, weight_decay=cfg.schedule.weight_decay
            )
            ds_config = {
                "train_micro_batch_size_per_gpu": cfg.data.batch_per_rank,
                "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": cfg.zero_stage},
                "bf16": {"enabled": True},
                "steps_per_print": 10**9,
                "pma": self.pma_config.to_dict(),
            }
            self.engine, self.optimizer, _, _ = initialize(
                model=model, optimizer=optimizer, config=ds_config
            )
            self.model = self.engine
            self.merger = self.engine.pma
        else:
            raise ValueError(f"engine = {cfg.engine!r}: must be fsdp2 or deepspeed")

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        logits = self.model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def step(self, batch: torch.Tensor) -> float:
        loss = self._loss(batch)
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.merger.step(tokens=self.tokens_per_step)
        return loss.item()

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        """Mean held-out loss over every rank's batches."""
        total = torch.stack([self._loss(b) for b in batches]).mean().detach().cpu()
        dist.all_reduce(total)
        return total.item() / self.world

    def evaluate_merged(self, batches: list[torch.Tensor], methods: list[str]) -> dict[str, float]:
        if self.merger.num_snapshots == 0:
            return {}
        out = {}
        for method in methods:
            with self.merger.swapped(None if self.pma_config.running else method):
                out[method] = self.evaluate(batches)
            if self.pma_config.running:
                break
        return out

    def save(self, directory: Path, state: dict[str, Any]) -> None:
        """A resumable checkpoint, then ``trainer.json`` beside it (the phase and step, readable
        before the checkpoint is loaded)."""
        if self.engine is not None:
            self.engine.save_checkpoint(
                str(directory), tag="state", client_state={"trainer": state}
            )
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            dcp.save(
                {"model": model_sd, "optim": optim_sd, "pma": self.merger, "trainer": state},
                checkpoint_id=str(directory),
            )
        if dist.get_rank() == 0:
            (directory / "trainer.json").write_text(json.dumps(state))
        dist.barrier()

    @staticmethod
    def saved_phase(directory: Path) -> str | None:
        """The phase a checkpoint was saved in (None: no checkpoint there)."""
        saved = directory / "trainer.json"
        return json.loads(saved.read_text())["phase"] if saved.is_file() else None

    def load(self, directory: Path) -> dict[str, Any]:
        if self.engine is not None:
            path, client = self.engine.load_checkpoint(str(directory), tag="state")
            if path is None:
                raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint")
            return client["trainer"]
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        trainer = {"phase": "main", "step": 0}
        state = {"model": model_sd, "optim": optim_sd, "pma": self.merger, "trainer": trainer}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        return state["trainer"]

    def export_live(self, path: Path, tokenizer) -> Path:
        return export_model(
            self.model, path, tokenizer=tokenizer, config=self.hf_config(), progress=False
        )

    def export_merged(self, path: Path, tokenizer) -> Path:
        return self.merger.export(
            path, tokenizer=tokenizer, config=self.hf_config(), progress=False
        )

    def hf_config(self):
        module = self.engine.module if self.engine is not None else self.model
        return module.config
