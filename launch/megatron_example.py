"""Megatron-Core 0.16 with PMA: the lines a Megatron training loop adds (needs GPUs, as
Megatron-Core's CUDA code does; data and tensor parallelism, with the distributed optimizer):

    torchrun --standalone --nproc-per-node 8 launch/megatron_example.py

1. ``attach(model, optimizer, config)`` right after ``get_megatron_optimizer``: each
   successful ``optimizer.step()`` counts a step's global tokens and takes a snapshot of the
   fp32 main shards when one is due (a step Megatron skips takes none).
2. ``merger.swapped()`` evaluates the merge without stopping training; ``save_checkpoint``
   keeps the average inside Megatron's checkpoint of an iteration (``check_checkpoint`` and
   ``load_checkpoint`` resume it at any data- and tensor-parallel size), and
   ``export_checkpoint`` writes the merge as a Megatron ``torch_dist`` checkpoint.

The model is a small GPT on random tokens so that the script runs as it is; a real run keeps
its own model, data and checkpointing and adds the lines marked PMA.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from pma_dist.integrations.megatron import attach, detach, export_checkpoint, save_checkpoint

MICRO_BATCH, SEQUENCE, VOCAB, STEPS = 4, 256, 1024, 200
PMA = {"method": "sma", "window": 10, "interval_steps": 20}
"""The paper spaces snapshots by billions of tokens; this short run every 20 steps."""


def main() -> None:
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=4, hidden_size=512, num_attention_heads=8, bf16=True,
        params_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    layers = get_gpt_layer_local_spec()
    gpt = GPTModel(config, layers, vocab_size=VOCAB, max_sequence_length=SEQUENCE)
    gpt = Float16Module(config, gpt.cuda())
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config, ddp, gpt)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-4, bf16=True, use_distributed_optimizer=True),
        [model],
    )
    tokens_per_step = MICRO_BATCH * SEQUENCE * dist.get_world_size()
    merger = attach(model, optimizer, PMA, tokens_per_step=tokens_per_step)  # PMA

    positions = torch.arange(SEQUENCE, device="cuda").expand(MICRO_BATCH, SEQUENCE)
    for step in range(STEPS):
        batch = torch.randint(0, VOCAB, (MICRO_BATCH, SEQUENCE + 1), device="cuda")
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = model(batch[:, :-1], positions, None, labels=batch[:, 1:]).float().mean()
        loss.backward()
        model.finish_grad_sync()
        optimizer.step()  # PMA: a snapshot when one is due
        if merger.num_snapshots and step % 50 == 49:
            with torch.no_grad(), merger.swapped():  # PMA: the merge, restored bitwise after
                merged = model(batch[:, :-1], positions, None, labels=batch[:, 1:]).float().mean()
            if dist.get_rank() == 0:
                print(f"step {step}: loss {float(loss):.4f}, merged {float(merged):.4f}")
    save_checkpoint(merger, f"checkpoints/iter_{STEPS:07d}", STEPS)  # PMA: beside Megatron's
    export_checkpoint(merger, "checkpoints/merged_torch_dist", "sma")  # PMA: the merge
    detach(merger)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
