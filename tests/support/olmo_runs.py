"""A real OLMo-core trainer on CPU ranks (gloo): a tiny Llama-like transformer under FSDP2,
synthetic token batches from memory, a checkpointer that saves synchronously (async saves
hang on gloo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from olmo_core.data.collator import DataCollator
from olmo_core.data.data_loader import TextDataLoaderBase
from olmo_core.distributed.parallel import DataParallelType
from olmo_core.distributed.utils import get_rank, get_world_size
from olmo_core.nn.transformer import TransformerConfig
from olmo_core.optim import AdamWConfig
from olmo_core.train import Duration, TrainerConfig
from olmo_core.train.callbacks import Callback, CheckpointerCallback
from olmo_core.train.train_module import (
    TransformerDataParallelConfig,
    TransformerTrainModuleConfig,
)

VOCAB, SEQ, ROWS = 64, 16, 2
"""2 sequences of 16 tokens a rank: 64 global tokens a step at 2 ranks."""


class SyntheticLoader(TextDataLoaderBase):
    """``total`` batches, each rank's rows drawn from a generator seeded by (batch, rank), so a
    resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, work_dir: Path, total: int) -> None:
        world = get_world_size()
        super().__init__(
            collator=DataCollator(pad_token_id=0),
            work_dir=work_dir,
            global_batch_size=ROWS * SEQ * world,
            dp_world_size=world,
            dp_rank=get_rank(),
            fs_local_rank=get_rank(),
        )
        self.total = total

    @property
    def total_batches(self) -> int:
        return self.total

    def state_dict(self) -> dict[str, Any]:
        return {"batches_processed": self.batches_processed, "epoch": self._epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_processed = state_dict["batches_processed"]
        self._epoch = state_dict["epoch"]

    def reshuffle(self, epoch: int | None = None, **kwargs: Any) -> None:
        self._epoch = epoch or 1

    def _iter_batches(self):
        for index in range(self.batches_processed, self.total):
            gen = torch.Generator().manual_seed(1000 * index + self.dp_rank)
            yield {"input_ids": torch.randint(1, VOCAB, (ROWS, SEQ), generator=gen)}

    def get_mock_batch(self) -> dict[str, Any]:
        return {"input_ids": torch.ones(ROWS, SEQ, dtype=torch.long)}


class Recorder(Callback):
    """Every parameter in full, fp64 on CPU, after every step (collective under FSDP)."""

    priority = 3

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def post_train_batch(self) -> None:
        self.weights.append(full_weights(self.trainer.train_module.model))


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full, fp64 (copies; collective under FSDP)."""
    from tests.support.models import full_state

    return {name: p.double() for name, p in full_state(model).items()}


def build_trainer(
    folder: Path,
    steps: int,
    callbacks: dict[str, Callback],
    *,
    save_interval: int = 1000,
    batches: int | None = None,
    dp: str = "fsdp",
):
    """A trainer for ``steps`` steps saving checkpoints every ``save_interval`` under
    ``folder``; the same model init (seed 0) on every call. OLMo-core keeps one world mesh per
    process: it is forgotten first, so that one process group runs several trainers in turn."""
    import olmo_core.distributed.parallel as parallel

    parallel._WORLD_MESH = None
    torch.manual_seed(0)
    model = TransformerConfig.llama_like(
        d_model=16, vocab_size=VOCAB, n_layers=2, n_heads=2, hidden_size_multiple_of=16
    ).build(init_device="cpu")
    module = TransformerTrainModuleConfig(
        rank_microbatch_size=ROWS * SEQ,
        max_sequence_length=SEQ,
        optim=AdamWConfig(lr=3e-2),
        dp_config=TransformerDataParallelConfig(name=DataParallelType(dp)),
    ).build(model, device=torch.device("cpu"))
    loader = SyntheticLoader(folder / "work", total=batches or steps)
    checkpointer = CheckpointerCallback(save_interval=save_interval, save_async=False)
    config = TrainerConfig(
        save_folder=str(folder / "run"),
        work_dir=str(folder / "work"),
        save_overwrite=True,
        max_duration=Duration.steps(steps),
        metrics_collect_interval=1000,
        callbacks={"checkpointer": checkpointer, **callbacks},
    )
    return config.build(module, loader)


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """The model weights of an OLMo-core checkpoint's ``model_and_optim``, in full, fp64, read
    by OLMo-core's own reader in this process (no process group)."""
    from olmo_core.distributed.checkpoint import get_checkpoint_metadata, load_keys

    path = directory / "model_and_optim"
    keys = sorted(
        k for k in get_checkpoint_metadata(path).state_dict_metadata if k.startswith("model.")
    )
    return {key: t.double() for key, t in zip(keys, load_keys(path, keys))}


def held_out_evaluator():
    """An OLMo-core ``EvaluatorCallback`` (run only when asked) over one fixed batch a rank,
    keeping the mean loss (averaged over ranks) of each evaluation by prefix in ``.losses``."""
    import torch.distributed as dist
    from olmo_core.eval.evaluator import Evaluator
    from olmo_core.train.callbacks import EvaluatorCallback

    class HeldOutLoss(Evaluator):
        def __init__(self) -> None:
            gen = torch.Generator().manual_seed(777 + get_rank())
            batch = {"input_ids": torch.randint(1, VOCAB, (ROWS, SEQ), generator=gen)}
            super().__init__(name="held_out", batches=[batch])
            self.values: list[float] = []
            self.reset_metrics()

        def update_metrics(self, batch, ce_loss, logits) -> None:
            self._sum += ce_loss.double().sum()
            self._count += ce_loss.numel()

        def compute_metrics(self) -> dict[str, torch.Tensor]:
            mean = (self._sum / self._count).reshape(1)
            dist.all_reduce(mean)
            mean /= get_world_size()
            self.values.append(float(mean))
            return {"loss": mean.float()}

        def reset_metrics(self) -> None:
            self._sum, self._count = torch.zeros((), dtype=torch.float64), 0

    class Recording(EvaluatorCallback):
        """Keeps the mean loss of each evaluation by the prefix it was asked for."""

        def perform_eval(self, prefix: str = "eval") -> None:
            super().perform_eval(prefix=prefix)
            self.losses = {**getattr(self, "losses", {}), prefix: self.evaluators[0].values[-1]}

    return Recording(evaluators=[HeldOutLoss()], eval_interval=None)
