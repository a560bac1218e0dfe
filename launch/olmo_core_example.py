"""PMA in an OLMo-core run: ``torchrun --nproc-per-node 2 launch/olmo_core_example.py OUT``.

A tiny transformer trained on random tokens (a numpy memmap, OLMo-core's own data path) under
FSDP2 on CPU; ``PMACallback`` replaces ``ModelMergeCallback``. Stop it and run it again: it
resumes from the last checkpoint, the average with it. Swap in your own model, data and config.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
from olmo_core.distributed.parallel import DataParallelType
from olmo_core.distributed.utils import get_rank
from olmo_core.nn.transformer import TransformerConfig
from olmo_core.optim import AdamWConfig
from olmo_core.train import (
    Duration,
    TrainerConfig,
    prepare_training_environment,
    teardown_training_environment,
)
from olmo_core.train.callbacks import CheckpointerCallback
from olmo_core.train.train_module import (
    TransformerDataParallelConfig,
    TransformerTrainModuleConfig,
)

from pma_dist.integrations.olmo_core import PMACallback

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/olmo_core_example")
prepare_training_environment(backend="gloo")
tokens = out / "tokens.npy"
if get_rank() == 0 and not tokens.exists():
    out.mkdir(parents=True, exist_ok=True)
    np.random.default_rng(0).integers(1, 100, 1 << 16, dtype=np.uint16).tofile(tokens)
torch.distributed.barrier()

tokenizer = TokenizerConfig(vocab_size=128, eos_token_id=0, pad_token_id=0)
model = TransformerConfig.llama_like(
    d_model=64, vocab_size=128, n_layers=2, n_heads=4, hidden_size_multiple_of=64
).build(init_device="cpu")
module = TransformerTrainModuleConfig(
    rank_microbatch_size=4 * 64,
    max_sequence_length=64,
    optim=AdamWConfig(lr=1e-3),
    dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp),
).build(model, device=torch.device("cpu"))
dataset = NumpyFSLDatasetConfig(
    paths=[str(tokens)], sequence_length=64, tokenizer=tokenizer, work_dir=str(out / "work")
).build()
loader = NumpyDataLoaderConfig(global_batch_size=8 * 64, seed=0).build(
    dataset, dp_process_group=module.dp_process_group
)
pma = PMACallback({"window": 4, "interval_tokens": 4 * 8 * 64}, merge_interval=40)
trainer = TrainerConfig(
    save_folder=str(out / "run"),
    max_duration=Duration.steps(80),
    callbacks={
        "checkpointer": CheckpointerCallback(save_interval=30, save_async=False),
        "pma": pma,
    },
).build(module, loader)
trainer.fit()  # merged checkpoints: out/run/step40-pma, step80-pma
print(f"rank {get_rank()}: merge of snapshots (step, tokens) {pma.merger.history}")
teardown_training_environment()
