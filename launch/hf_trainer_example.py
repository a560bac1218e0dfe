"""transformers Trainer + PMA in one file: a small Llama from a config on random tokens, the
merged model evaluated beside the live one and exported.

    torchrun --nproc-per-node 2 launch/hf_trainer_example.py     # DDP on CPU (gloo) or GPUs
    python launch/hf_trainer_example.py                           # one process

With DeepSpeed, pass ``deepspeed=<config with a "pma" section>`` to TrainingArguments and
``PMACallback()`` with no config.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from pma_dist.integrations.hf import PMACallback

VOCAB, SEQ = 256, 64


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count: int, seed: int) -> None:
        self.tokens = torch.randint(
            0, VOCAB, (count, SEQ), generator=torch.Generator().manual_seed(seed)
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


if __name__ == "__main__":
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir="runs/hf_trainer_example", max_steps=40, per_device_train_batch_size=8,
        learning_rate=3e-3, lr_scheduler_type="constant", save_steps=20, logging_steps=10,
        include_num_input_tokens_seen=True, report_to=[], use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    pma = PMACallback(
        {"window": 4, "interval_tokens": 4 * 8 * SEQ}, export_dir=f"{args.output_dir}/pma"
    )
    trainer = Trainer(
        model=LlamaForCausalLM(config), args=args, train_dataset=RandomTokens(2048, 0),
        eval_dataset=RandomTokens(64, 1), callbacks=[pma],
    )  # fmt: skip
    trainer.train()
    live, merged = trainer.evaluate(), pma.evaluate(trainer)
    if trainer.is_world_process_zero():
        print(f"eval_loss live {live['eval_loss']:.4f}, PMA {merged['eval_pma_loss']:.4f}")
