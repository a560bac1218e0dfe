"""torchtitan 0.3.0 with PMA: the two changes a training script makes (needs GPUs, as the
torchtitan trainer does; run from a torchtitan checkout, whose debug config reads its test
tokenizer and dataset):

    torchrun --standalone --nproc-per-node 8 launch/torchtitan_example.py

1. The model spec's ``post_optimizer_build_fn`` becomes PMA's, which runs the spec's own one
   first (the MoE load-balancing hook), so snapshots hold the expert biases of their step.
2. The Merger joins the checkpointer's states as ``"pma"`` before ``train()`` loads a checkpoint.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel
from torchtitan.tools.logging import init_logger

from pma_dist.integrations import torchtitan as pma_titan

PMA = {"method": "sma", "window": 10, "interval_tokens": "1M"}
"""The paper spaces snapshots by billions of tokens; the debug run is 10 steps of 512K."""


def main() -> None:
    init_logger()
    config = deepseek_v3_debugmodel()
    config.training.global_batch_size = 32  # fixed, so the tokens of a step are known here
    config.training.steps = 40
    tokens = config.training.global_batch_size * config.training.seq_len
    spec = config.model_spec
    build = pma_titan.post_optimizer_build_fn(
        {**PMA, "tokens_per_step": tokens}, inner=spec.post_optimizer_build_fn
    )
    config.model_spec = dataclasses.replace(spec, post_optimizer_build_fn=build)

    trainer = config.build()
    merger = pma_titan.join(trainer.checkpointer, trainer.optimizers)
    try:
        trainer.train()
        merger.export(f"{config.dump_folder}/pma-merged", format="dcp")
    finally:
        pma_titan.detach(trainer.optimizers)
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
